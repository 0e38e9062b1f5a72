"""PEFT adapter folders: find one (a `slmops finetune` output holds it in adapter/), read its base, attach it;
and what `-m` and `--adapter_path` name together."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from slmops.errors import UsageError, first_line
from slmops.models.catalog import resolve
from slmops.models.genai import is_genai_folder

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


def split_spec(item: str) -> tuple[str | None, str | None]:
    """A --compare item: MODEL, MODEL@ADAPTER or @ADAPTER (a path containing @ that exists is a model)."""
    if "@" not in item or Path(item).expanduser().exists():
        return item, None
    model, _, adapter = item.rpartition("@")
    return model or None, adapter


def model_and_adapter(model_name_or_path: str | None, adapter_path: str | None) -> tuple[str, Path | None, str | None]:
    """What `-m` and `--adapter_path` name: the model, its PEFT adapter folder (a finetune output folder's
    adapter/), or for an exported folder the name of one of its adapters; no `-m`: the adapter's base. `-m`
    alone may be an adapter folder, or a finetune output folder holding one: its base plus that adapter."""
    onnx = model_name_or_path is not None and is_genai_folder(model_name_or_path)
    run = Path(model_name_or_path or "").expanduser()
    if model_name_or_path and adapter_path is None and not onnx and run.is_dir() and \
            any((run / sub / "adapter_config.json").is_file() for sub in ("", "adapter")) and \
            not any((run / sub / "config.json").exists() for sub in ("", "model")):
        model_name_or_path, adapter_path = None, model_name_or_path  # an adapter (or its run folder): base + it
    adapter = adapter_dir(adapter_path) if adapter_path and not onnx else None
    if model_name_or_path is None:
        if adapter is None:
            raise UsageError("pass --model_name_or_path, or --adapter_path to use the adapter's base model")
        model_name_or_path = base_model_of(adapter)
    return model_name_or_path, adapter, adapter_path if onnx else None


def locate(model_name_or_path: str | None, adapter_path: str | None) -> tuple[str, Path | None, str | None]:
    """`model_and_adapter`, with a model path that cannot be had refused now, before any model loads."""
    model, adapter, onnx_adapter = model_and_adapter(model_name_or_path, adapter_path)
    if not is_genai_folder(model):
        resolve(model)
    return model, adapter, onnx_adapter
