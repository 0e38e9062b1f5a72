"""PEFT adapter folders: find one (a `slmops finetune` output holds it in adapter/), read its base, attach it."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from slmops.errors import UsageError, first_line


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


def attach_adapter(model: nn.Module, adapter: Path, base_name: str) -> nn.Module:
    """`model` wrapped with the PEFT adapter in `adapter`; an adapter made for another base is one line."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter)
    except (RuntimeError, ValueError, KeyError) as err:
        raise UsageError(f"adapter {adapter} does not fit model {base_name} ({first_line(err)[:160]}); "
                         f"pass the base model it was trained on") from None
