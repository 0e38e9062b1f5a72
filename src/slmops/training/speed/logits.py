"""Logits only where a label is supervised: the LM head and the last MLP skip every other position."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from slmops.data.formatting import IGNORE


def supervised_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the positions whose next token is supervised, those tokens, and the mask of the
    positions (position t's target is labels[t + 1]). `logits` is either (positions kept, vocab) from
    `logits_to_keep`, or the full (batch, length, vocab) when the model cannot skip positions."""
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


def takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether the model can skip the vocabulary projection at positions nobody reads."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft wrapper takes **kwargs
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def kept_positions(kwargs: dict) -> torch.Tensor | None:
    """A forward call's boolean `logits_to_keep`, as the collator passes it (one flag per input position),
    or None when the call has none of that kind."""
    keep, ids = kwargs.get("logits_to_keep"), kwargs.get("input_ids")
    if isinstance(keep, torch.Tensor) and keep.dtype == torch.bool and ids is not None and keep.shape == ids.shape:
        return keep
    return None


def last_mlp(model: nn.Module) -> nn.Module | None:
    """The dense MLP of the model's last decoder layer, or None (no such layer, or a mixture of experts)."""
    layers = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == layers and hasattr(module[-1], "mlp"):
            mlp = module[-1].mlp
            dense = not any(isinstance(m, nn.ModuleList) for m in mlp.modules())
            return mlp if isinstance(mlp, nn.Module) and dense else None
    return None


def mlp_at_kept_positions(model: nn.Module) -> bool:
    """Run the last layer's MLP only where logits are kept (a boolean `logits_to_keep`, as the collator
    passes): its output at any other position reaches no logit, so its gradient there is zero and the
    work was for nothing. With a one-word answer that is nearly all of the last layer's MLP.

    Only for losses that read the kept logits alone: the hidden state at other positions is left
    without the last MLP's contribution. Returns False when the model has no dense last MLP."""
    mlp = last_mlp(model)
    if mlp is None:
        return False
    kept: list[torch.Tensor | None] = [None]

    def remember(module, args, kwargs):
        keep = kept_positions(kwargs)
        kept[0] = keep if keep is not None and bool(keep.any()) else None

    def gather(module, args):
        keep = kept[0]
        if keep is None or args[0].shape[:2] != keep.shape:
            return None
        return (args[0][keep][None],)  # (1, kept, hidden): MLPs that expect (batch, length, hidden) still work

    def scatter(module, args, output):
        keep = kept[0]
        if keep is None or not isinstance(output, torch.Tensor) or output.shape[1] != int(keep.sum()):
            return None
        full = output.new_zeros(*keep.shape, output.shape[-1])
        full[keep] = output[0]
        return full

    model.register_forward_pre_hook(remember, with_kwargs=True)  # the outer model: peft calls .forward inside
    mlp.register_forward_pre_hook(gather)
    mlp.register_forward_hook(scatter)
    return True
