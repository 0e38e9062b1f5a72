"""LoRA layers on CPU with less work around their two small matmuls; what they learn is unchanged.

On SmolLM2 a LoRA step spent about a quarter of its time around the adapters rather than in the
model: drawing dropout masks, and the passes autograd makes over every activation for
`base(x) + B(A(dropout(x))) * scale` (the scale, the sum, their gradients, and the sum of the
base's and the adapter's input gradients). Two replacements, used only where they apply:

- `FastDropout` draws the same Bernoulli mask (keep probability to within 2^-16) from numpy's
  SFC64 generator, 16 bits an element, and builds the float mask in numpy: 4x cheaper than torch's
  Mersenne Twister draw plus its casts (1.4x in place, where memory is cold). It is seeded from
  torch's generator on every call, so `torch.manual_seed`, the Trainer's saved RNG state and
  gradient checkpointing's replay of that state still decide every mask.
- `FusedLoraLinear` runs a vanilla LoRA layer as one autograd function: the scaled low-rank product
  is added into the base output by the matmul itself (`addmm_`), the backward pass puts the
  adapter's share of the input gradient into the base's in one pass, and dropout's 1/(1-p) joins the
  adapter's scale, so the mask is 0/1.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from torch import nn


class FastDropout(nn.Module):
    """`nn.Dropout` with a cheaper random mask on CPU."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        # Drop when a uniform 16-bit integer in [-32768, 32767] falls below this threshold.
        self.threshold = round(p * 65536) - 32768

    def mask(self, x: torch.Tensor, scaled: bool = True) -> torch.Tensor:
        """The dropout mask for `x`: 1/(1-p) where kept (one multiply applies dropout), or 1 with
        `scaled=False` for a caller that folds the scale into its own product."""
        n = x.numel()
        seed = int(torch.randint(0, 2**62, ()))
        bits = np.random.SFC64(seed).random_raw((n + 3) // 4).view(np.int16)[:n]
        keep = (bits >= self.threshold).astype(np.float32)
        if scaled:
            keep *= np.float32(1 / (1 - self.p))
        keep = torch.from_numpy(keep).view(x.shape)
        return keep if keep.dtype == x.dtype else keep.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        return x * self.mask(x)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + b + scale * ((x * mask) A^T) B^T, with `mask` None when nothing is dropped."""

    @staticmethod
    def forward(ctx, x, mask, weight, bias, lora_a, lora_b, scale):
        y = F.linear(x, weight, bias)
        dropped = x if mask is None else x * mask
        h = F.linear(dropped, lora_a)
        y.view(-1, y.shape[-1]).addmm_(h.view(-1, h.shape[-1]), lora_b.t(), alpha=scale)
        ctx.scale = scale
        ctx.save_for_backward(dropped, mask, h, weight, lora_a, lora_b)
        return y

    @staticmethod
    def backward(ctx, grad):
        dropped, mask, h, weight, lora_a, lora_b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_h = (g @ lora_b).mul_(ctx.scale)
        grad_a = grad_h.t() @ dropped.reshape(-1, dropped.shape[-1])
        grad_b = g.t() @ (h.view(-1, h.shape[-1]) * ctx.scale)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight
            if mask is None:
                grad_x.addmm_(grad_h, lora_a)
            else:
                grad_x.addcmul_(grad_h @ lora_a, mask.view(-1, mask.shape[-1]))
            grad_x = grad_x.view(*grad.shape[:-1], weight.shape[1])
        return grad_x, None, None, None, grad_a, grad_b, None


class FusedLoraLinear(LoraLinear):
    """peft's LoRA `Linear`, run by `_LoraLinearFunction` on CPU for one plain adapter on an
    `nn.Linear`; anything else (GPU, DoRA, merged, several adapters, ...) takes peft's path."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._fusable(x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        dropout, scale, mask = self.lora_dropout[name], self.scaling[name], None
        if isinstance(dropout, FastDropout) and dropout.training and dropout.p:
            # a 0/1 mask, exact in any dtype; dropout's 1/(1-p) joins the adapter's scale
            mask, scale = dropout.mask(x, scaled=False), scale / (1 - dropout.p)
        inputs = [x, mask, self.base_layer.weight, self.base_layer.bias, self.lora_A[name].weight,
                  self.lora_B[name].weight]
        if torch.is_autocast_enabled("cpu"):  # what autocast would do: every matmul in its dtype
            dtype = torch.get_autocast_dtype("cpu")
            inputs = [t if t is None else t.to(dtype) for t in inputs]
            with torch.autocast("cpu", enabled=False):
                return _LoraLinearFunction.apply(*inputs, scale)
        return _LoraLinearFunction.apply(*inputs, scale)

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
                if isinstance(dropout, nn.Dropout) and dropout.p > 0:
                    dropouts[adapter] = FastDropout(dropout.p)
        if type(module) is LoraLinear:
            module.__class__ = FusedLoraLinear
            switched += 1
    return switched
