"""The served model: one base in memory and its LoRA adapters, loaded and unloaded while serving.

An adapter is checked against the base before it is accepted: its recorded base, its layers (each
must be a linear layer of this base with the same shapes) and its kind (LoRA, which peft can mix
per row). A mismatch is an `AdapterError` (HTTP 400), never a crash in the middle of a batch.
"""

from __future__ import annotations

import json
import logging
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from slmops.errors import UsageError
from slmops.models.adapters import adapter_dir
from slmops.models.loading import load_model, resolve
from slmops.models.tokenizers import load_tokenizer

log = logging.getLogger(__name__)

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


class AdapterError(UsageError):
    """An adapter that cannot be served on this base; the message says why."""


class ModelPool:
    """The base model (as a peft model once an adapter is loaded) and the adapters by model id."""

    def __init__(self, model_name_or_path: str, served_name: str | None = None, trust_remote_code: bool = False):
        from slmops.models.genai import is_genai_folder

        if is_genai_folder(model_name_or_path):
            raise UsageError(f"{model_name_or_path} is an ONNX Runtime GenAI folder; `slmops serve` runs PyTorch "
                             f"models for now: serve the model it was exported from (and its adapters)")
        self.path = resolve(model_name_or_path)
        self.base_id = served_name or model_name_or_path
        self.tokenizer = load_tokenizer(self.path, trust_remote_code)
        cuda = torch.cuda.is_available()
        self.model = load_model(self.path, torch.bfloat16 if cuda else torch.float32, trust_remote_code,
                                device_map="cuda" if cuda else None).eval()
        self.model.config.use_cache = True
        self.device = next(self.model.parameters()).device
        self.adapters: dict[str, str] = {}  # model id -> folder
        self.lock = threading.Lock()  # held by a batch while it decodes; adapters change only between batches
        self.pending = 0  # adapter changes waiting for the lock: a running batch admits no arrivals meanwhile
        self._count = threading.Lock()
        config = self.model.config
        self.context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048)

    def ids(self) -> list[str]:
        return [self.base_id, *self.adapters]

    def peft_name(self, model_id: str) -> str | None:
        """The adapter to apply for a request's `model`, BASE for the base; None for an unknown id."""
        if model_id == self.base_id:
            return BASE
        return model_id if model_id in self.adapters else None

    def load(self, name: str, path: str) -> None:
        """Check the adapter against the base, then add it under `name`."""
        if name == self.base_id or name in self.adapters or name == BASE:
            raise AdapterError(f"model id {name!r} is taken; unload it first or choose another lora_name")
        folder = _adapter_folder(path)
        _check_fits(folder, self.model)
        from peft import PeftModel

        with self._changing():
            if not self.adapters:
                self.model = PeftModel.from_pretrained(self.model, folder, adapter_name=name).eval()
            else:
                self.model.load_adapter(folder, adapter_name=name)
            self.adapters[name] = str(folder)
        log.info("adapter %s loaded from %s", name, folder)

    def unload(self, name: str) -> None:
        if name not in self.adapters:
            raise AdapterError(f"no adapter named {name!r}; loaded: {', '.join(self.adapters) or 'none'}")
        with self._changing():
            if len(self.adapters) > 1:
                self.model.delete_adapter(name)
            else:
                self.model = self.model.unload().eval()  # the plain base again
            del self.adapters[name]
        log.info("adapter %s unloaded", name)


    @contextmanager
    def _changing(self) -> Iterator[None]:
        """The lock, once the batch that holds it has drained (it admits no one while this waits)."""
        with self._count:
            self.pending += 1
        try:
            with self.lock:
                yield
        finally:
            with self._count:
                self.pending -= 1


def _adapter_folder(path: str) -> Path:
    try:
        return adapter_dir(path)
    except UsageError as err:
        raise AdapterError(str(err)) from None


def _check_fits(folder: Path, base: Any) -> None:
    """Refuse an adapter peft cannot mix per row, or one whose layers this base does not have alike."""
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        kind = "DoRA" if config.get("use_dora") else config.get("peft_type")
        raise AdapterError(f"adapter {folder}: a {kind} adapter; the server mixes plain LoRA adapters per request "
                           f"(merge it with `slmops auto-opt` or serve its merged model instead)")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise AdapterError(f"adapter {folder}: no adapter_model.safetensors (pass the folder `slmops finetune` wrote)")
    from safetensors import safe_open

    modules = dict(base.named_modules())
    with safe_open(str(weights), framework="pt") as fh:
        for key in fh.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            module = key.removeprefix("base_model.model.").split(".lora_")[0]
            layer = modules.get(module) or modules.get(f"base_model.model.{module}")
            shape = fh.get_slice(key).get_shape()
            side = "A" if ".lora_A." in key else "B"
            if layer is None or not hasattr(layer, "in_features"):
                raise AdapterError(f"adapter {folder} adapts {module}, which this base does not have as a linear "
                                   f"layer: it was trained on another base model")
            base_layer = getattr(layer, "base_layer", layer)
            want = base_layer.in_features if side == "A" else base_layer.out_features
            got = shape[1] if side == "A" else shape[0]
            if got != want:
                raise AdapterError(f"adapter {folder}: {module} has {got} {'inputs' if side == 'A' else 'outputs'} "
                                   f"there and {want} in this base: it was trained on another base model")
