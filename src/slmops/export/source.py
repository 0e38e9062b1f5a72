"""What to export: a model, a model plus adapter, or a `slmops finetune` output folder."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slmops.artifacts.folders import read_json
from slmops.errors import UsageError
from slmops.models.adapters import adapter_dir, attach_adapter, base_model_of
from slmops.models.catalog import resolve
from slmops.models.loading import load_model
from slmops.models.tokenizers import load_tokenizer, tokenizer_folder
from slmops.options.finetune_options import DataOptions

log = logging.getLogger(__name__)


@dataclass
class Source:
    base: str                  # resolved base model: a local folder or a cached hub id
    adapter: Path | None       # a PEFT adapter folder to merge, if any
    manifest: dict | None      # the finetune run that made the adapter (its data gives parity prompts)


def run_manifest(folder: Path) -> dict | None:
    """The manifest of the `slmops finetune` run that wrote `folder`, if it is one."""
    manifest = read_json(folder / "manifest.json")
    return manifest if isinstance(manifest, dict) and manifest.get("command") == "finetune" else None


def find_source(model_name_or_path: str | None, adapter_path: str | None) -> Source:
    """Olive's flags, plus a finetune output folder in either place (base model read from its manifest), and
    an `auto-opt` folder for -m: its recorded source, exported again (at another precision, say)."""
    if model_name_or_path and (Path(model_name_or_path).expanduser() / "genai_config.json").is_file():
        return find_source(*exported_from(Path(model_name_or_path).expanduser(), adapter_path))
    model_run = run_manifest(Path(model_name_or_path).expanduser()) if model_name_or_path else None
    if model_run is not None and adapter_path is None:
        run = Path(model_name_or_path).expanduser()
        if (run / "model" / "config.json").exists():  # --merge or --method full: the model is already whole
            return Source(str(run / "model"), None, model_run)
        return Source(_base_of(model_run), adapter_dir(str(run)), model_run)
    adapter = adapter_dir(adapter_path) if adapter_path else None
    manifest = run_manifest(adapter.parent) if adapter is not None else None
    if model_name_or_path is None:
        if adapter is None:
            raise UsageError("pass --model_name_or_path (and optionally --adapter_path)")
        model_name_or_path = base_model_of(adapter)
    return Source(resolve(model_name_or_path), adapter, manifest or model_run)


def exported_from(folder: Path, adapter_path: str | None) -> tuple[str, str | None]:
    """The model (and adapter) an `auto-opt` folder was exported from, read from its manifest. The export's
    own weights are not rounded again: the builder quantizes from the PyTorch weights, the tied embedding
    too, and the parity gate compares with the PyTorch model."""
    manifest = read_json(folder / "manifest.json")
    command = manifest.get("command") if isinstance(manifest, dict) else None
    if command == "generate-adapter":
        raise UsageError(f"{folder} is a generate-adapter folder; run generate-adapter again on its base and "
                         f"adapters with --precision int4")
    if command != "auto-opt":
        raise UsageError(f"{folder} is an ONNX folder without the auto-opt manifest that names its source; pass "
                         f"the Hugging Face model it came from as --model_name_or_path")
    if adapter_path:
        raise UsageError(f"{folder} is an ONNX export; --adapter_path goes with a PyTorch model: pass the model "
                         f"it came from as --model_name_or_path")
    resolved = manifest.get("resolved", {})
    base, adapter = resolved.get("base_model"), resolved.get("adapter")
    gone = [p for p in (base, adapter) if p and (Path(p).is_absolute() or p == adapter) and not Path(p).exists()]
    if gone or not base:
        raise UsageError(f"{folder} was exported from {gone[0] if gone else 'a model it does not name'}, which is "
                         f"not there (relative paths are read from the current folder); pass the source model "
                         f"as --model_name_or_path")
    log.info("%s is an ONNX export; exporting its source %s again", folder,
             " + ".join(p for p in (base, adapter) if p))
    return base, adapter


def _base_of(manifest: dict) -> str:
    recorded = manifest.get("resolved", {}).get("model_path")
    if recorded and Path(recorded).is_dir():
        return recorded
    return resolve(manifest["options"]["model_name_or_path"])


def run_data(manifest: dict) -> DataOptions:
    """The data options a finetune run trained with (its rows give parity prompts and calibration rows)."""
    return DataOptions(**{k: v for k, v in manifest["options"].items() if k in DataOptions.model_fields})


def trained_for(source: Source) -> str | None:
    """The export precision the adapter was trained against (`finetune --quantization_aware`), if any."""
    return quantization_aware(source.manifest) if source.adapter is not None else None


def quantization_aware(manifest: dict | None) -> str | None:
    """What a finetune run's manifest says its adapter was trained for (`--quantization_aware`)."""
    return (manifest or {}).get("options", {}).get("quantization_aware")


def load_reference(source: Source, trust_remote_code: bool, int4_base: bool = False) -> tuple[Any, Any]:
    """The PyTorch model the export must match (adapter merged, fp32) and its tokenizer; with
    `int4_base`, the base rounded as the int4 export holds it (what a quantization-aware adapter saw)."""
    tokenizer = load_tokenizer(tokenizer_folder(source.adapter, source.base), trust_remote_code)
    model = load_model(source.base, torch.float32, trust_remote_code)
    if int4_base:
        from slmops.models.fake_quant import fake_quantize
        fake_quantize(model)
    if source.adapter is not None:
        model = attach_adapter(model, source.adapter, source.base).merge_and_unload()
    model.config.use_cache = True
    return model.eval(), tokenizer


def save_for_builder(model: Any, tokenizer: Any, source: Source, folder: Path) -> Path:
    """A local Hugging Face folder the builder reads; the base folder itself when nothing was merged."""
    if source.adapter is None and Path(source.base).is_dir():
        return Path(source.base)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
