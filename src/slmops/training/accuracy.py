"""Task metrics at each evaluation, computed from the logits the loss already needs.

`accuracy` is the share of responses whose every token is the model's top choice given the tokens
before it. That is exactly when greedy decoding reproduces the response, so for a classification
template it is the greedy-prediction accuracy, at no cost beyond the evaluation's forward pass.

`f1` is the macro-F1 of the label greedy decoding starts: each response's class is its first token,
which decides the label when the labels begin with different tokens (positive/negative, A/B/C). Where
two labels share their first token, or there are more than 20, it is left out.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from transformers import EvalPrediction

from slmops.training.speed.logits import supervised_logits

MAX_CLASSES = 20  # as many labels as `data check` counts as a classification


def response_outcomes(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per response (a run of supervised tokens): [every token the arg-max (1/0), the gold first token,
    the predicted first token, the gold response's first three tokens as one number].

    `logits` are at the supervised positions only (as `causal_lm_loss` receives them) or full.
    """
    logits, targets, supervised = supervised_logits(logits, labels)
    predicted = logits.argmax(-1)
    # a response starts wherever a supervised position follows an unsupervised one (or opens the row)
    starts = (supervised & ~F.pad(supervised, (1, 0))[..., :-1])[supervised]
    response = starts.cumsum(0) - 1
    count = int(response[-1]) + 1 if len(response) else 0
    misses = torch.zeros(count, device=predicted.device).index_add_(0, response, (predicted != targets).float())
    position = torch.arange(len(targets), device=targets.device) - starts.nonzero().flatten()[response]
    digits = torch.where(position < 3, targets.long() << (20 * position.clamp(max=2)), 0)
    code = torch.zeros(count, dtype=torch.long, device=targets.device).index_add_(0, response, digits)
    return torch.stack([(misses == 0).long(), targets[starts].long(), predicted[starts].long(), code], dim=1)


def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
    rows = np.asarray(prediction.predictions).reshape(-1, 4)
    rows = rows[rows[:, 0] >= 0]  # the Trainer pads between processes with -100
    if not len(rows):
        return {}
    correct, gold, predicted, code = rows.T
    f1 = _macro_f1(gold, predicted, code)
    return {"accuracy": float(correct.mean()), **({"f1": f1} if f1 is not None else {})}


def _macro_f1(gold: np.ndarray, predicted: np.ndarray, code: np.ndarray) -> float | None:
    classes = np.unique(gold)
    if len(classes) > MAX_CLASSES or len(classes) != len(np.unique(code)):  # first tokens do not decide
        return None
    scores = []
    for c in classes:
        tp, fp = np.sum((gold == c) & (predicted == c)), np.sum((gold != c) & (predicted == c))
        fn = np.sum((gold == c) & (predicted != c))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores))
