"""LoRA layers on CPU with less work around their two small matmuls; what they learn is unchanged.

On SmolLM2 a LoRA step spent about a quarter of its time around the adapters rather than in the
model: drawing dropout masks, and the passes autograd makes over every activation for
`base(x) + B(A(dropout(x))) * scale` (the scale, the sum, their gradients, and the sum of the
base's and the adapter's input gradients). Two replacements, used only where they apply:

- `FastDropout` draws only the positions it zeroes: the gaps between them are geometric, which is
  an independent Bernoulli(p) draw per element, for about p of the random numbers (one uniform
  and one log per dropped element). The draw comes from torch's generator, so
  `torch.manual_seed`, the Trainer's saved RNG state and gradient checkpointing's replay of that
  state decide every mask. No float mask is built or kept for the backward pass, only the indices.
- `FusedLoraLinear` runs a vanilla LoRA layer as one autograd function: the scaled low-rank product
  is added into the base output by the matmul itself (`addmm_`), and so is the adapter's share of
  the input gradient into the base's (the base's values are then put back at the dropped
  positions). Dropout's 1/(1-p) joins the adapter's scale, so dropping is a plain fill with zeros.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from torch import nn


def bernoulli_positions(n: int, p: float, sigmas: float = 8.0) -> torch.Tensor:
    """The increasing positions in [0, n) where independent Bernoulli(p) draws come up 1.

    Gaps between them are geometric, drawn by inversion, ceil(log(1 - U) / log(1 - p)), from float32
    uniforms: the per-element probability is p to within 2^-24, at about half float64's time. Each
    round draws enough gaps to pass n but for a `sigmas`-standard-deviation shortfall; a shortfall
    only costs another round."""
    per_log = 1 / math.log1p(-p)
    rounds, last = [], -1
    while True:
        expected = (n - 1 - last) * p
        gaps = torch.empty(max(int(expected + sigmas * expected ** 0.5) + 16, 1))
        gaps = gaps.uniform_().neg_().log1p_().mul_(per_log).ceil_().clamp_min_(1).long()
        positions = gaps.cumsum_(0).add_(last)
        last = int(positions[-1])
        if last >= n:
            rounds.append(positions[: int(torch.searchsorted(positions, n))])
            return rounds[0] if len(rounds) == 1 else torch.cat(rounds)
        rounds.append(positions)


class FastDropout(nn.Module):
    """`nn.Dropout` (0 < p < 1) that draws only the positions it drops, on CPU."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def dropped(self, x: torch.Tensor) -> torch.Tensor:
        """Positions in `x.reshape(-1)` to zero."""
        return bernoulli_positions(x.numel(), self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        return (x * (1 / (1 - self.p))).reshape(-1).index_fill(0, self.dropped(x), 0).view(x.shape)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + b + scale * (x' A^T) B^T, where x' is x with the elements at flat positions
    `drop` zeroed (`drop` is None when nothing is dropped)."""

    @staticmethod
    def forward(ctx, x, drop, weight, bias, lora_a, lora_b, scale):
        y = F.linear(x, weight, bias)
        dropped = x if drop is None else x.reshape(-1).index_fill(0, drop, 0).view(x.shape)
        h = F.linear(dropped, lora_a)
        y.view(-1, y.shape[-1]).addmm_(h.view(-1, h.shape[-1]), lora_b.t(), alpha=scale)
        ctx.scale = scale
        ctx.save_for_backward(dropped, drop, h, weight, lora_a, lora_b)
        return y

    @staticmethod
    def backward(ctx, grad):
        dropped, drop, h, weight, lora_a, lora_b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_h = (g @ lora_b).mul_(ctx.scale)
        grad_a = grad_h.t() @ dropped.reshape(-1, dropped.shape[-1])
        grad_b = g.t() @ (h.view(-1, h.shape[-1]) * ctx.scale)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight
            base = None if drop is None else grad_x.view(-1).take(drop)
            grad_x.addmm_(grad_h, lora_a)
            if base is not None:  # dropped inputs get no adapter gradient: put the base's back
                grad_x.view(-1).index_copy_(0, drop, base)
            grad_x = grad_x.view(*grad.shape[:-1], weight.shape[1])
        return grad_x, None, None, None, grad_a, grad_b, None


class FusedLoraLinear(LoraLinear):
    """peft's LoRA `Linear`, run by `_LoraLinearFunction` on CPU for one plain adapter on an
    `nn.Linear`; anything else (GPU, DoRA, merged, several adapters, ...) takes peft's path."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._fusable(x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        dropout, scale, drop = self.lora_dropout[name], self.scaling[name], None
        if isinstance(dropout, FastDropout) and dropout.training:
            # dropout's 1/(1-p) joins the adapter's scale; the dropped elements are zero fills
            drop, scale = dropout.dropped(x), scale / (1 - dropout.p)
        params = [self.base_layer.weight, self.base_layer.bias, self.lora_A[name].weight, self.lora_B[name].weight]
        if torch.is_autocast_enabled("cpu"):  # what autocast would do: every matmul in its dtype
            dtype = torch.get_autocast_dtype("cpu")
            x, *params = [t if t is None else t.to(dtype) for t in (x, *params)]
            with torch.autocast("cpu", enabled=False):
                return _LoraLinearFunction.apply(x, drop, *params, scale)
        return _LoraLinearFunction.apply(x, drop, *params, scale)

    def _fusable(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
        """The one active adapter's name when the fused path computes exactly peft's layer, else None."""
        if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        base = self.base_layer
        if (name not in self.lora_A or name in self.lora_variant or self.lora_B[name].bias is not None
                or type(base) is not nn.Linear or self.fan_in_fan_out or x.device.type != "cpu"
                or base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad)
                or not isinstance(self.lora_dropout[name], (FastDropout, nn.Identity))):
            return None
        dtypes = {x.dtype, base.weight.dtype, self.lora_A[name].weight.dtype, self.lora_B[name].weight.dtype}
        return name if len(dtypes) == 1 or torch.is_autocast_enabled("cpu") else None


def use_fast_lora(model: nn.Module) -> int:
    """Swap every adapter dropout for `FastDropout`, and peft's LoRA `Linear` layers for
    `FusedLoraLinear` (same parameters, same state dict); returns how many layers were switched."""
    switched = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, nn.ModuleDict):
            for adapter, dropout in list(dropouts.items()):
                if isinstance(dropout, nn.Dropout) and 0 < dropout.p < 1:
                    dropouts[adapter] = FastDropout(dropout.p)
        if type(module) is LoraLinear:
            module.__class__ = FusedLoraLinear
            switched += 1
    return switched
