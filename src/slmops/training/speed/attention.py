"""Attention row by row over a packed batch: what padding-free training should cost on a CPU."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SEGMENTED = "slmops_segmented_sdpa"


# arguments of transformers' SDPA wrapper that calling PyTorch's SDPA directly would not apply
_WRAPPER_ONLY = ("is_causal", "position_bias", "softcap")
# Rows up to this long attend in fp32 on a CPU: PyTorch's bf16 flash-attention backward is the slower
# one there for short rows (SST-2's 23-token rows: 8.0 ms a layer in bf16, 3.2 in fp32 with the casts;
# about even at 192-256 tokens; bf16 is faster from ~384 on: 2048-token rows 106 against 147 ms).
UPCAST_ROWS = 256


def segmented_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, row_bounds: torch.Tensor | None = None,
                   shared_prefix: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, run separately on each row of a packed batch (`row_bounds` from
    the collator: start offsets plus the total length); with `shared_prefix`, the first segment is
    the prefix the other rows continue from, and each row attends to it and then to itself. Anything
    else goes to transformers' SDPA unchanged.

    Rows call PyTorch's SDPA directly, as transformers' wrapper would (scale, dropout, grouped
    heads), and their outputs are joined before the one transpose back to (batch, length, heads,
    dim): the wrapper's per-call transposes and copies were a fifth of attention's time. Arguments
    only the wrapper applies (`_WRAPPER_ONLY`) send each row through the wrapper instead.

    Short rows in bf16 or fp16 on a CPU attend in fp32 (`UPCAST_ROWS`), packed or not: faster there,
    no less exact, and the same arithmetic for a row whether it comes packed or alone."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    packed = row_bounds is not None and query.shape[0] == 1 and query.shape[2] == int(row_bounds[-1])
    prefix = int(shared_prefix) if packed and shared_prefix is not None else 0
    sizes = row_bounds.diff().tolist() if packed else []
    cpu = query.device.type == "cpu"
    # the dtype PyTorch's SDPA would compute and return in: autocast's, else the inputs'
    dtype = torch.get_autocast_dtype("cpu") if cpu and torch.is_autocast_enabled("cpu") else query.dtype
    longest = prefix + max(sizes) if packed else key.shape[2]
    upcast = cpu and dtype in (torch.bfloat16, torch.float16) and longest <= UPCAST_ROWS
    if upcast:
        query, key, value = query.float(), key.float(), value.float()
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():  # autocast would cast back
        if not packed:
            out = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)[0]
        else:
            out = torch.cat(_attend_rows(module, query, key, value, sizes, prefix, kwargs), dim=2).transpose(1, 2)
    return out.to(dtype).contiguous(), None


def _attend_rows(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 sizes: list[int], prefix: int, kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """Each row's attention output, (1, heads, row length, dim); see `segmented_sdpa`."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    window = kwargs.get("sliding_window")
    if any(kwargs.get(name) is not None for name in _WRAPPER_ONLY) or not getattr(module, "is_causal", True):
        def attend(q, k, v, mask):
            return sdpa_attention_forward(module, q, k, v, mask, **kwargs)[0].transpose(1, 2)
    else:
        options = dict(dropout_p=kwargs.get("dropout", 0.0), scale=kwargs.get("scaling"),
                       enable_gqa=query.shape[1] != key.shape[1])

        def attend(q, k, v, mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, **options)
    # split, not slices: the backward of a split is one concatenation, that of each slice a zero-filled
    # tensor the size of the whole batch
    queries, keys, values = (t.split(sizes, dim=2) for t in (query, key, value))
    outputs = []
    for i, (q, k, v) in enumerate(zip(queries, keys, values)):
        offset = prefix if i > 0 else 0
        if offset:  # the prefix is the first segment
            k = torch.cat([keys[0], k], dim=2)
            v = torch.cat([values[0], v], dim=2)
        mask = None  # causal within the row
        if offset or (window and sizes[i] > window):
            positions = torch.arange(offset, offset + sizes[i], device=query.device)
            seen = torch.cat([torch.arange(offset, device=query.device), positions])
            mask = positions[:, None] >= seen[None]
            if window:
                mask &= positions[:, None] - seen[None] < window
            mask = mask[None, None]
        outputs.append(attend(q, k, v, mask))
    return outputs


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
