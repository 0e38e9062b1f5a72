"""Probes of a model, tried rather than assumed: can it keep packed rows apart, and does it drop out?"""

from __future__ import annotations

import logging

import torch
from torch import nn

from slmops.data.collate import Collator
from slmops.training.speed.fast_lora import FastDropout
from slmops.training.speed.logits import takes_logits_to_keep

log = logging.getLogger(__name__)


def drops_out(model: nn.Module) -> bool:
    """Whether training draws any dropout mask: a dropout layer, the adapters' included, or a dropout
    rate in the model's config (attention dropout is a kernel argument, not a layer)."""
    if any(isinstance(m, (nn.Dropout, FastDropout)) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    rates = config.to_dict().items() if config is not None else ()
    return any(("dropout" in key or "pdrop" in key) and isinstance(value, float) and value > 0
               for key, value in rates)


def supports_packing(model: nn.Module) -> bool:
    """Whether this model keeps packed rows apart and can compute logits at chosen positions.

    Tried, not assumed: two short random rows run separately and packed must give the same logits
    (a model whose attention ignores `position_ids` boundaries would mix the rows). transformers
    separates packed rows only without a KV cache, so training must run with `use_cache=False`.
    """
    if not takes_logits_to_keep(model):
        return False
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (7, 5)]
    batch = Collator(0, pack=True, keep_logits=False)([{"input_ids": r, "labels": r} for r in rows])
    batch = {k: v.to(model.device) for k, v in batch.items() if k != "labels"}
    batch["logits_to_keep"] = torch.ones_like(batch["input_ids"], dtype=torch.bool)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            separate = [model(input_ids=torch.tensor([r], device=model.device), use_cache=False).logits[0]
                        for r in rows]
            separate = torch.cat(separate).float()
            packed = model(**batch, use_cache=False).logits.float()
    except Exception as err:  # any failure means: do not pack this model
        log.debug("packing probe failed: %s", err)
        return False
    finally:
        model.train(training)
    if packed.shape != separate.shape:
        return False
    # Rounding moves logits by a tiny share of their spread; a row that sees the other moves by about all of it.
    tolerance = 1e-2 if next(model.parameters()).dtype == torch.float32 else 1e-1
    return (packed - separate).abs().max().item() <= tolerance * separate.std().item()
