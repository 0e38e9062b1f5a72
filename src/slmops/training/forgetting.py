"""Forgetting check: perplexity on a few KB of general English before and after fine-tuning.

A fine-tune should change what it was trained for, not the model's general language; a large rise
here is the cheapest early sign of catastrophic forgetting (too high a learning rate, too many epochs).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F

from slmops.artifacts.report import FORGETTING_RATIO
from slmops.data.reference import reference_text

log = logging.getLogger(__name__)


@torch.no_grad()
def reference_perplexity(model: Any, tokenizer: Any, window: int = 512) -> float:
    """Perplexity of the model on the reference text, in windows of `window` tokens."""
    ids = tokenizer(reference_text(), add_special_tokens=False)["input_ids"]
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    window = min(window, limit - 1) if limit else window  # positions past the table do not exist
    device = next(model.parameters()).device
    training = model.training
    model.eval()
    try:
        total, count = 0.0, 0
        for lo in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[lo: lo + window + 1]], device=device)
            logits = model(input_ids=chunk[:, :-1], use_cache=False).logits[0].float()
            total += F.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
            count += chunk.shape[1] - 1
    finally:
        model.train(training)
    return math.exp(total / count)


def compare(before: float, after: float) -> dict[str, float]:
    """The manifest entry; warns when general text got much harder for the model."""
    ratio = after / before
    if ratio > FORGETTING_RATIO:
        log.warning("perplexity on general text rose %.1fx (%.1f -> %.1f): the model may be forgetting what it "
                    "knew; lower --learning_rate or --num_train_epochs, or use a smaller --lora_r", ratio,
                    before, after)
    return {"reference_perplexity_before": round(before, 3), "reference_perplexity_after": round(after, 3),
            "ratio": round(ratio, 3)}
