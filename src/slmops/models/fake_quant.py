"""Adapters trained against the weights an int4 export will hold (`finetune --quantization_aware int4`).

ONNX Runtime's int4 format (MatMulNBits) as its RTN quantizer writes it (`--algorithm rtn`, which an
export of a quantization-aware adapter uses) keeps each block of 32 input weights of a linear layer as
4-bit integers times one scale: symmetric, the block's largest-magnitude weight maps to -8. An adapter trained on the float base meets other weights after such an export and
loses accuracy (SST-2, SmolLM2-135M: 85.2% in PyTorch, 78.7% through int4 ONNX). Trained on the
round-tripped weights themselves, with the adapter kept in float beside the int4 base at export, it
answers through ONNX as it did in training (85.1%).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BLOCK = 32


def int4_round_trip(weight: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """`weight` (out, in) as MatMulNBits int4 stores it, back in float: blocks run along the input
    dimension (zero-padded to a whole block, as the quantizer pads)."""
    rows, cols = weight.shape
    w = F.pad(weight.float(), (0, -cols % block)).reshape(rows, -1, block)
    peak = torch.gather(w, -1, w.abs().argmax(-1, keepdim=True))
    scale = peak / -8
    q = torch.clamp(torch.round(w / torch.where(scale == 0, 1.0, scale)) + 8, 0, 15)
    return ((q - 8) * scale).reshape(rows, -1)[:, :cols].to(weight.dtype)


@torch.no_grad()
def fake_quantize(model: nn.Module) -> int:
    """Replace every linear layer's weight (the LM head included; tied embeddings with it) by its int4
    round trip; returns how many matrices changed. Call before attaching the adapter."""
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            module.weight.copy_(int4_round_trip(module.weight))
    return len(seen)
