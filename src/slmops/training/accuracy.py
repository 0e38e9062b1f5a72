"""Task metrics at each evaluation, computed from the logits the loss already needs.

`accuracy` is the share of responses whose every token is the model's top choice given the tokens
before it. That is exactly when greedy decoding reproduces the response, so for a classification
template it is the greedy-prediction accuracy, at no cost beyond the evaluation's forward pass.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import EvalPrediction

from slmops.training.speed.logits import supervised_logits


def response_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per response (a run of supervised tokens): 1 if every token is the arg-max, else 0.

    `logits` are at the supervised positions only (as `causal_lm_loss` receives them) or full.
    """
    logits, targets, supervised = supervised_logits(logits, labels)
    hit = logits.argmax(-1) == targets
    # a response starts wherever a supervised position follows an unsupervised one (or opens the row)
    starts = supervised & ~torch.nn.functional.pad(supervised, (1, 0))[..., :-1]
    response = starts[supervised].cumsum(0) - 1
    misses = torch.zeros(int(response[-1]) + 1 if len(response) else 0, device=hit.device)
    misses.index_add_(0, response, (~hit).float())
    return (misses == 0).long()


def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
    correct = np.asarray(prediction.predictions).reshape(-1)
    correct = correct[correct >= 0]  # the Trainer pads between batches with -100
    return {"accuracy": float(correct.mean()) if len(correct) else float("nan")}
