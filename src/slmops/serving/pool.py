"""The served model: one base in memory and its LoRA adapters, loaded and unloaded while serving.

An adapter is checked against the base before it is accepted: its recorded base, its layers (each
must be a linear layer of this base with the same shapes) and its kind (plain LoRA, which the batch
mixes per row). A mismatch is an `AdapterError` (HTTP 400), never a crash in the middle of a batch.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from slmops.errors import UsageError
from slmops.models.adapters import adapter_dir
from slmops.models.catalog import resolve
from slmops.models.loading import load_model
from slmops.models.tokenizers import load_tokenizer
from slmops.serving.jobs import BASE, Worker
from slmops.serving.multi_lora import Routing, add_adapter, read_lora, remove_adapter

log = logging.getLogger(__name__)


class AdapterError(UsageError):
    """An adapter that cannot be served on this base; the message says why."""


class Pool:
    """What the HTTP side needs of a served model, whatever runs it: ids, the tokenizer, the end-of-sequence
    tokens, the context, and the adapters by model id, loaded and unloaded while serving."""

    def __init__(self, base_id: str, tokenizer: Any, eos: set[int], context: int):
        self.base_id, self.tokenizer, self.context = base_id, tokenizer, context
        self.eos = eos | ({tokenizer.eos_token_id} - {None})
        self.adapters: dict[str, str] = {}  # model id -> where it was loaded from
        self.lock = threading.Lock()  # held by the decoder while it decodes; adapters change only outside it
        self.pending = 0  # adapter changes waiting for the lock: a running batch admits no arrivals meanwhile
        self._count = threading.Lock()

    def ids(self) -> list[str]:
        return [self.base_id, *self.adapters]

    def adapter_for(self, model_id: str) -> str | None:
        """The adapter to apply for a request's `model`, BASE for the base; None for an unknown id."""
        if model_id == self.base_id:
            return BASE
        return model_id if model_id in self.adapters else None

    def load(self, name: str, path: str) -> None:
        raise NotImplementedError

    def unload(self, name: str) -> None:
        raise NotImplementedError

    def decoder(self, telemetry: Any, max_batch: int, max_queue: int) -> Worker:
        """The thread that decodes this model's requests."""
        raise NotImplementedError

    def check_free(self, name: str) -> None:
        if name == self.base_id or name in self.adapters or name == BASE:
            raise AdapterError(f"model id {name!r} is taken; unload it first or choose another lora_name")

    def check_loaded(self, name: str) -> None:
        if name not in self.adapters:
            raise AdapterError(f"no adapter named {name!r}; loaded: {', '.join(self.adapters) or 'none'}")

    @contextmanager
    def changing(self) -> Iterator[None]:
        """The lock, once the batch that holds it has drained (it admits no one while this waits)."""
        with self._count:
            self.pending += 1
        try:
            with self.lock:
                yield
        finally:
            with self._count:
                self.pending -= 1


class ModelPool(Pool):
    """A PyTorch base (as a peft model once an adapter is loaded) and its LoRA adapters."""

    def __init__(self, model_name_or_path: str, served_name: str | None = None, trust_remote_code: bool = False,
                 torch_dtype: str = "auto"):
        self.path = resolve(model_name_or_path)
        cuda = torch.cuda.is_available()
        dtype = (torch.bfloat16 if cuda else torch.float32) if torch_dtype == "auto" else getattr(torch, torch_dtype)
        self.model = load_model(self.path, dtype, trust_remote_code, device_map="cuda" if cuda else None).eval()
        self.model.config.use_cache = True
        self.routing = Routing()  # which adapter each row of the next forward uses
        self.device = next(self.model.parameters()).device
        config, eos = self.model.config, self.model.generation_config.eos_token_id
        context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048)
        super().__init__(served_name or model_name_or_path, load_tokenizer(self.path, trust_remote_code),
                         {*(eos if isinstance(eos, list) else [eos] if eos is not None else [])}, context)

    def load(self, name: str, path: str) -> None:
        """Check the adapter against the base, then add it under `name`."""
        self.check_free(name)
        folder = _adapter_folder(path)
        try:
            lora = read_lora(folder, self.model)
        except UsageError as err:
            raise AdapterError(str(err)) from None
        with self.changing():
            add_adapter(self.model, self.routing, name, lora)
            self.adapters[name] = str(folder)
        log.info("adapter %s loaded from %s", name, folder)

    def unload(self, name: str) -> None:
        self.check_loaded(name)
        with self.changing():
            remove_adapter(self.model, name)
            del self.adapters[name]
        log.info("adapter %s unloaded", name)

    def decoder(self, telemetry: Any, max_batch: int, max_queue: int) -> Worker:
        from slmops.serving.scheduler import Scheduler

        return Scheduler(self, telemetry, max_batch, max_queue)


def _adapter_folder(path: str) -> Path:
    try:
        return adapter_dir(path)
    except UsageError as err:
        raise AdapterError(str(err)) from None

