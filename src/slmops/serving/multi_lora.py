"""Many LoRA adapters on one base, each row of a batch under its own adapter, in one forward.

peft can mix adapters per row (`adapter_names`), but in every adapted layer it splits the batch by adapter
in Python and registers hooks on every module for each forward: on SmolLM2-135M at 16 rows over three
adapters a decode step cost several times the plain base's. Here (Punica's idea, for CPU as well as GPU)
each adapted layer keeps the adapters the batch uses side by side, their A matrices stacked on the rank
axis and their B matrices (scaling folded in) beside each other, and a row keeps only its own adapter's
rank columns through a 0/1 mask:

    y = base(x) + ((x @ A_all.T) * mask[row]) @ B_all.T

two small matmuls a layer whatever the mix of adapters, exact (the other adapters' columns are zeroed
before B). The stacks are rebuilt only when the set of adapters in the batch changes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slmops.errors import UsageError
from slmops.models.adapters import check_layers
from slmops.serving.jobs import BASE


class Routing:
    """Which adapter each row of the next forward uses, shared by every adapted layer of the model."""

    def __init__(self) -> None:
        self.names: tuple[str, ...] = ()  # the adapters the batch uses, in a fixed order
        self.rows: torch.Tensor | None = None  # each row's index into `names` (-1: the base); None: all names[0]
        self._masks: dict[tuple, torch.Tensor] = {}

    def route(self, adapters: list[str], device: torch.device) -> None:
        self.names = tuple(sorted({a for a in adapters if a != BASE}))
        self._masks = {}
        if len(self.names) == 1 and BASE not in adapters:
            self.rows = None  # every row under the one adapter: no mask needed
        else:
            index = {name: i for i, name in enumerate(self.names)}
            self.rows = torch.tensor([index.get(a, -1) for a in adapters], device=device)

    def mask(self, layout: tuple[tuple[int, int], ...], dtype: torch.dtype) -> torch.Tensor | None:
        """1 where a row's own adapter owns a rank column, for stacks laid out as (index in `names`, rank)
        pairs; None when every row has the one adapter. Built once a forward per layout, not per layer."""
        if self.rows is None:
            return None
        if layout not in self._masks:
            columns = torch.cat([torch.full((rank,), i, device=self.rows.device) for i, rank in layout])
            self._masks[layout] = (self.rows[:, None] == columns[None, :]).to(dtype)[:, None, :]
        return self._masks[layout]


class MixedLoraLinear(nn.Module):
    """A linear layer of the base plus every loaded adapter's low-rank update, applied per row."""

    def __init__(self, base_layer: nn.Module, routing: Routing):
        super().__init__()
        self.base_layer, self.routing = base_layer, routing
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (A.T [in, r], (B*scaling).T [r, out])
        self._stack: tuple[Any, ...] = ((), None)  # the names it was built for, and (A_all.T, B_all.T, layout)

    def put(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        self.lora[name] = (a.T.contiguous(), b.T.contiguous())
        self._stack = ((), None)

    def drop(self, name: str) -> bool:
        """Forget adapter `name`; True when this layer had it."""
        self._stack = ((), None)
        return self.lora.pop(name, None) is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        names = self.routing.names
        if self._stack[0] != names:
            self._stack = (names, self._stacked(names))
        if self._stack[1] is None:
            return y
        a, b, layout = self._stack[1]
        h = x @ a
        mask = self.routing.mask(layout, h.dtype)
        if mask is not None:
            h.mul_(mask)
        return y.view(-1, self.out_features).addmm_(h.view(-1, h.shape[-1]), b).view(y.shape)

    def _stacked(self, names: tuple[str, ...]) -> tuple[Any, ...] | None:
        mine = [(i, self.lora[n]) for i, n in enumerate(names) if n in self.lora]
        if not mine:
            return None
        layout = tuple((i, ab[0].shape[1]) for i, ab in mine)
        return torch.cat([ab[0] for _, ab in mine], dim=1), torch.cat([ab[1] for _, ab in mine]), layout


def read_lora(folder: Path, base: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """An adapter's update per base module, as (A, B*scaling), checked against `base` (an `UsageError` says
    what does not fit): plain LoRA on linear layers of this base, with the shapes this base has."""
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    variant = ("DoRA" if config.get("use_dora") else "aLoRA" if config.get("alora_invocation_tokens")
               else "LoRA with biases" if config.get("lora_bias") else None)
    if config.get("peft_type") != "LORA" or variant:
        raise UsageError(f"adapter {folder}: a {variant or config.get('peft_type')} adapter; the server mixes plain "
                         f"LoRA adapters per request (merge it with `slmops auto-opt` or serve its merged model)")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise UsageError(f"adapter {folder}: no adapter_model.safetensors (pass the folder `slmops finetune` wrote)")
    from safetensors.torch import load_file

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(weights)).items():
        module, sep, part = key.removeprefix("base_model.model.").partition(".lora_")
        if not sep or part not in ("A.weight", "B.weight"):
            raise UsageError(f"adapter {folder}: holds {key}, which a plain LoRA adapter does not (modules_to_save "
                             f"or an embedding adapter); merge it with `slmops auto-opt` or serve its merged model")
        pairs.setdefault(module, {})[part[0]] = tensor
    check_layers(str(folder), {m: (p["A"].shape[1], p["B"].shape[0]) for m, p in pairs.items()}, base,
                 "the served base")
    return {m: (p["A"], p["B"] * _scaling(config, m, p["A"].shape[0])) for m, p in pairs.items()}


def _scaling(config: dict, module: str, rank: int) -> float:
    """peft's scaling of a module's update: alpha (or the alpha_pattern entry whose key ends the module's name,
    peft's rule) over the rank, or over its square root for rsLoRA. (Matched here: importing peft for it
    would add a second and a half to the server's start.)"""
    patterns = config.get("alpha_pattern") or {}
    found = [key for key in patterns if re.match(rf"(.*\.)?({key})$", module)]
    alpha = patterns[found[0]] if found else config.get("lora_alpha", 8)
    return alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank


def add_adapter(model: nn.Module, routing: Routing, name: str, lora: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Put adapter `name` on `model`'s layers, wrapping each adapted layer once."""
    param = next(model.parameters())
    for module, (a, b) in lora.items():
        layer = model.get_submodule(module)
        if not isinstance(layer, MixedLoraLinear):
            parent, _, child = module.rpartition(".")
            layer = MixedLoraLinear(layer, routing)
            setattr(model.get_submodule(parent) if parent else model, child, layer)
        layer.put(name, a.to(param.device, param.dtype), b.to(param.device, param.dtype))


def remove_adapter(model: nn.Module, name: str) -> None:
    """Take adapter `name` off `model`; a layer no adapter uses any more is the plain base layer again."""
    for module, layer in list(model.named_modules()):
        if isinstance(layer, MixedLoraLinear) and layer.drop(name) and not layer.lora:
            parent, _, child = module.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer.base_layer)
