"""ONNX Runtime GenAI folders: score and decode token ids, with or without a named adapter.

One small wrapper serves the parity gate, `slmops generate` and evaluation, so the exported
model is always checked through the same runtime a user deploys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from slmops.errors import UsageError, first_line
from slmops.models.threads import free_threads

GENAI_CONFIG = "genai_config.json"
ADAPTER_SUFFIX = ".onnx_adapter"


def is_genai_folder(path: str | Path) -> bool:
    return (Path(path).expanduser() / GENAI_CONFIG).is_file()


def adapter_files(folder: Path) -> dict[str, Path]:
    """The adapters `slmops generate-adapter` wrote: adapters/NAME.onnx_adapter."""
    return {p.name.removesuffix(ADAPTER_SUFFIX): p for p in sorted((folder / "adapters").glob(f"*{ADAPTER_SUFFIX}"))}


def load_genai(folder: Path, config: dict[str, Any], **engine: Any) -> Any:
    """An `onnxruntime_genai.Model` of an exported folder (`config`: its genai_config.json, read by the
    caller), computing on the free cores (`free_threads`) unless that config names a thread count: left to
    itself, onnxruntime-genai ran the model on one thread of two (SmolLM2-135M int4 on 2 cores: a 21-token
    prefill 75 ms against 43 ms on two threads, a decode step 13.8 ms against 8.7). `engine`:
    onnxruntime-genai's engine settings, as serving sets them."""
    import onnxruntime_genai as og

    overlay = genai_overlay(config, engine)
    try:
        settings = og.Config(str(folder))
        if overlay:
            settings.overlay(json.dumps(overlay))
        return og.Model(settings)
    except RuntimeError as err:
        raise UsageError(f"onnxruntime_genai cannot load {folder} ({first_line(err)[:200]}); "
                         f"re-export it with `slmops auto-opt`") from None


def genai_overlay(config: dict[str, Any], engine: dict[str, Any]) -> dict[str, Any]:
    """What `load_genai` lays over a folder's genai_config.json: the engine settings, and the thread count."""
    overlay: dict[str, Any] = {"engine": engine} if engine else {}
    if "intra_op_num_threads" not in config.get("model", {}).get("decoder", {}).get("session_options", {}):
        overlay["model"] = {"decoder": {"session_options": {"intra_op_num_threads": free_threads()["threads"]}}}
    return overlay


class GenaiModel:
    """An exported model folder loaded with onnxruntime_genai."""

    def __init__(self, folder: str | Path):
        import onnxruntime_genai as og

        self.folder = Path(folder).expanduser()
        if not is_genai_folder(self.folder):
            hint = ("it holds .onnx files but no genai_config.json" if any(self.folder.glob("*.onnx"))
                    else "no genai_config.json there")
            raise UsageError(f"{folder} is not an ONNX Runtime GenAI folder ({hint}); export one with "
                             f"`slmops auto-opt --use_ort_genai`")
        self._og = og
        config = json.loads((self.folder / GENAI_CONFIG).read_text())
        self.model = load_genai(self.folder, config)
        self.context = config["model"]["context_length"]
        self.adapter_paths = adapter_files(self.folder)
        self._adapters = None

    def check_adapter(self, name: str) -> None:
        if name not in self.adapter_paths:
            known = ", ".join(self.adapter_paths) or "none"
            raise UsageError(f"adapter {name!r} is not in {self.folder}/adapters (adapters there: {known}); "
                             f"an ONNX folder's adapters are chosen by name")

    def generator(self, max_length: int, adapter: str | None, **search: float | bool):
        og = self._og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length, do_sample=False, **search)
        generator = og.Generator(self.model, params)
        if adapter is not None:
            self.check_adapter(adapter)
            if self._adapters is None:
                self._adapters = og.Adapters(self.model)
                for name, path in self.adapter_paths.items():
                    self._adapters.load(str(path), name)
            generator.set_active_adapter(self._adapters, adapter)
        return generator

    def logits(self, ids: list[int], adapter: str | None = None) -> np.ndarray:
        """Next-token logits at every position of `ids` ([len(ids), vocab], float32)."""
        generator = self.generator(len(ids), adapter)
        generator.append_tokens(ids)
        return np.asarray(generator.get_output("logits"), dtype=np.float32)[0, -len(ids):]

    def generate(self, ids: list[int], max_new_tokens: int, adapter: str | None = None,
                 on_token: Callable[[int], None] | None = None, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int = 42) -> list[int]:
        """New tokens after `ids` (greedy unless `do_sample`), stopping at the end-of-sequence token."""
        search = {"do_sample": True, "temperature": temperature, "top_p": top_p, "random_seed": seed} \
            if do_sample else {}
        if len(ids) >= self.context:
            raise UsageError(f"the prompt is {len(ids)} tokens; this model holds {self.context}: shorten it")
        generator = self.generator(min(len(ids) + max_new_tokens, self.context), adapter, **search)
        generator.append_tokens(ids)
        new: list[int] = []
        while not generator.is_done() and len(new) < max_new_tokens:
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            new.append(token)
            if on_token is not None:
                on_token(token)
        return new
