"""PEFT adapter folders: find one (a `slmops finetune` output holds it in adapter/), read its base, attach it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from slmops.errors import UsageError, first_line

if TYPE_CHECKING:  # torch is imported by the commands that load a model, not by every command
    from torch import nn


def adapter_dir(path: str) -> Path:
    """An adapter folder, or a `slmops finetune` output folder that holds one in adapter/."""
    p = Path(path).expanduser()
    for candidate in (p, p / "adapter"):
        if (candidate / "adapter_config.json").exists():
            return candidate
    raise UsageError(f"no adapter_config.json in {path} or {path}/adapter; pass the adapter folder that "
                     f"`slmops finetune` wrote")


def base_model_of(adapter: Path) -> str:
    """The model an adapter was trained on, as recorded in its config."""
    return json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]


def attach_adapter(model: nn.Module, adapter: Path, base_name: str, trainable: bool = False) -> nn.Module:
    """`model` wrapped with the PEFT adapter in `adapter` (`trainable`: to train it further); an adapter made
    for another base is one line."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as err:
        raise UsageError(f"adapter {adapter} does not fit model {base_name} ({first_line(err)[:160]}); "
                         f"pass the base model it was trained on") from None


def check_layers(adapter: str, layers: dict[str, tuple[int, int]], base: nn.Module, base_name: str) -> None:
    """Refuse an adapter whose layers (module -> (inputs, outputs)) this base does not have alike: the adapter
    was trained on another base model, and applying it would crash or mislead in the middle of a run."""
    modules = dict(base.named_modules())
    for module, got in layers.items():
        layer = modules.get(module) or modules.get(f"base_model.model.{module}")
        layer = getattr(layer, "base_layer", layer)
        if layer is None or not hasattr(layer, "in_features"):
            raise UsageError(f"adapter {adapter} adapts {module}, which {base_name} does not have as a linear "
                             f"layer: it was trained on a different base model")
        want = (layer.in_features, layer.out_features)
        if got != want:
            raise UsageError(f"adapter {adapter} was trained on a different base model: {module} is "
                             f"{got[0]}->{got[1]} there and {want[0]}->{want[1]} in {base_name}")
