"""Packed batches rounded up to a few lengths, so that a CPU's bf16 matmul kernels are built once, not per step.

PyTorch runs bf16 (and fp16) matmuls on a CPU through oneDNN, which builds (JIT-compiles) a kernel for
each new shape and keeps it in a cache. A packed batch's length is its rows' total, new nearly every
step, so every step built ~23 kernels afresh: on SmolLM2-135M with SST-2's 16-row batches (~350
tokens), ~35 ms of building and ~20 ms of slower first runs in a ~750 ms step. Rounding the length up
to 1/16 of its power of two (16 at 256-511 tokens, 128 at 2,048-4,095) leaves ~16 lengths per
doubling, each built once, for ~2% more tokens on average: ~9% faster steps, measured.

The extra tokens are a row of their own at the end of the pack (padding ids, positions from 0): rows
attend only within themselves (and to a shared prefix), and no logit is read there, so the real
rows' logits, loss and gradients are what they were. fp32 matmuls go to MKL, which builds nothing,
so fp32 models are left as they are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slmops.training.speed.logits import kept_positions


def rounded_length(length: int) -> int:
    """`length` rounded up to a multiple of 1/16 of its power of two (at least 16)."""
    step = max(16, 1 << max(length.bit_length() - 5, 0))
    return -(-length // step) * step


def round_packed_lengths(model: nn.Module, pad_token_id: int) -> bool:
    """Round every packed batch's length up (see the module docstring), where the model's matmuls run on
    a CPU in bf16 or fp16. Packed batches are those with `row_bounds` and a boolean `logits_to_keep`, as
    the collator makes them; anything else passes unchanged. Returns whether the model is rounded."""
    weights = next(model.parameters(), None)
    if weights is None or weights.device.type != "cpu" or not any(
            p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters()):
        return False

    def pad(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        keep, bounds, positions = kept_positions(kwargs), kwargs.get("row_bounds"), kwargs.get("position_ids")
        if args or keep is None or bounds is None or positions is None or keep.shape[0] != 1:
            return None
        ids = kwargs["input_ids"]
        length = ids.shape[1]
        extra = rounded_length(length) - length
        if extra == 0:
            return None
        kwargs = dict(kwargs)
        kwargs["input_ids"] = torch.cat([ids, ids.new_full((1, extra), pad_token_id)], dim=1)
        kwargs["position_ids"] = torch.cat([positions, torch.arange(extra, device=positions.device)[None]], dim=1)
        kwargs["logits_to_keep"] = torch.cat([keep, keep.new_zeros((1, extra))], dim=1)
        kwargs["row_bounds"] = torch.cat([bounds, bounds.new_tensor([length + extra])])
        return args, kwargs

    # first among the model's pre-hooks: the last MLP's (logits.mlp_at_kept_positions) must see the rounded batch
    model.register_forward_pre_hook(pad, with_kwargs=True, prepend=True)
    return True
