"""What makes adapter training fast on a CPU, each piece checked to leave the learning unchanged.

- Packing (see `slmops.data.collate`) is used only after `supports_packing` has seen, on this very
  model, that packed rows give the same logits as separate ones.
- `causal_lm_loss` takes logits computed only where a label is supervised.
- `use_segmented_attention`: PyTorch's CPU attention over a packed row computes every row against
  every other and masks the products away; a batch of 16 short rows then spends 16x the attention
  FLOPs (15% of a SmolLM2 step). Attention row by row costs what padding-free should.
- `FastDropout` replaces adapter dropout on CPU: torch draws one Mersenne-Twister number per element
  for `nn.Dropout`, which measured 30% of a LoRA step on SmolLM2; drawing 64 random bits and cutting
  them into four 16-bit uniforms is 4x cheaper for the same Bernoulli mask.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slmops.data.collate import Collator
from slmops.data.formatting import IGNORE

log = logging.getLogger(__name__)


def supervised_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the positions whose next token is supervised, those tokens, and the (batch, length - 1)
    mask of the positions. `logits` is either (positions kept, vocab) from `logits_to_keep`, or the full
    (batch, length, vocab) when the model cannot skip positions."""
    targets = labels[..., 1:]
    supervised = targets != IGNORE
    if logits.dim() == 3:
        logits = logits[:, :-1][supervised]
    return logits, targets[supervised], supervised


def causal_lm_loss(outputs, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None):
    """Token cross-entropy on the supervised positions, normalised like transformers' own loss."""
    logits, targets, supervised = supervised_logits(outputs.logits, labels)
    loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    return loss / (num_items_in_batch if num_items_in_batch is not None else supervised.sum().clamp(min=1))


SEGMENTED = "slmops_segmented_sdpa"


def segmented_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, row_bounds: torch.Tensor | None = None,
                   shared_prefix: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, run separately on each row of a packed batch (`row_bounds` from
    the collator: start offsets plus the total length); with `shared_prefix`, the first segment is
    the prefix the other rows continue from, and each row attends to it and then to itself. Anything
    else goes to SDPA unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if row_bounds is None or query.shape[0] != 1 or query.shape[2] != int(row_bounds[-1]):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    window = kwargs.get("sliding_window")
    prefix = int(shared_prefix) if shared_prefix is not None else 0
    outputs = []
    bounds = row_bounds.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        keys, values = key[:, :, start:end], value[:, :, start:end]
        offset = prefix if start > 0 else 0
        if offset:
            keys = torch.cat([key[:, :, :prefix], keys], dim=2)
            values = torch.cat([value[:, :, :prefix], values], dim=2)
        mask = None  # causal within the row
        if offset or (window and end - start > window):
            q = torch.arange(offset, offset + end - start, device=query.device)
            k = torch.cat([torch.arange(offset, device=query.device), q])
            mask = q[:, None] >= k[None]
            if window:
                mask &= q[:, None] - k[None] < window
            mask = mask[None, None]
        out, _ = sdpa_attention_forward(module, query[:, :, start:end], keys, values, mask, **kwargs)
        outputs.append(out)
    return torch.cat(outputs, dim=1), None


def use_segmented_attention(model: nn.Module) -> bool:
    """Switch a model on SDPA to `segmented_sdpa` (same masks, same results); False if it is on another."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(SEGMENTED, segmented_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SEGMENTED, sdpa_mask)
    model.set_attn_implementation(SEGMENTED)
    return True


def attends_row_by_row(model: nn.Module) -> bool:
    return getattr(model.config, "_attn_implementation", None) == SEGMENTED


def takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether the model can skip the vocabulary projection at positions nobody reads."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft wrapper takes **kwargs
    return "logits_to_keep" in inspect.signature(base.forward).parameters


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
    batch = Collator(0, pack=True)([{"input_ids": r, "labels": r} for r in rows])
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


class FastDropout(nn.Module):
    """`nn.Dropout` with a cheaper random mask on CPU (same keep probability to within 2^-16)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        # Drop when a uniform 16-bit integer in [-32768, 32767] falls below this threshold.
        self.threshold = round(p * 65536) - 32768

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        words = (x.numel() + 3) // 4
        bits = torch.empty(words, dtype=torch.int64).random_(-2**63, None)
        keep = bits.view(torch.int16)[: x.numel()].view(x.shape) >= self.threshold
        # A float mask holding the scale: one multiply forward and one backward (torch.where and a
        # separate scale measured 3x the time of both), the same products as x * scale where kept.
        return x * keep.to(x.dtype).mul_(1 / (1 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_dropout(model: nn.Module) -> int:
    """Swap every adapter dropout layer for `FastDropout`; returns how many were swapped."""
    swapped = 0
    for name, module in model.named_modules():
        if name.endswith("lora_dropout") and isinstance(module, nn.ModuleDict):
            for adapter, dropout in list(module.items()):
                if isinstance(dropout, nn.Dropout) and dropout.p > 0:
                    module[adapter] = FastDropout(dropout.p)
                    swapped += 1
    return swapped
