"""Workflow passes by type name: each turns the model so far into a new one in its own folder.

A pass is a function `(Step) -> ModelRef` that calls the same API as the matching command
(`finetune`, `auto-opt`, `generate-adapter`, `evaluate`), so a workflow and a command are one
code path. Each writes its folder completely or not at all (the APIs publish `OUT.partial`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from slmops.errors import UsageError
from slmops.workflow.config import finetune_options
from slmops.workflow.schema import FINETUNE_TYPES, Workflow

log = logging.getLogger(__name__)


@dataclass
class ModelRef:
    """The model between passes: a Hugging Face model (plus adapter) or an ONNX Runtime GenAI folder.
    `source` is the PyTorch model an ONNX folder was exported from (re-quantizing starts there)."""
    path: str
    adapter: str | None = None
    onnx: bool = False
    source: dict | None = None

    def describe(self) -> str:
        return self.path + (f" + adapter {self.adapter}" if self.adapter else "")


@dataclass
class Step:
    name: str
    type: str
    settings: BaseModel
    workflow: Workflow
    model: ModelRef
    out: Path
    owned: bool           # the folder is the engine's (under output_dir), not one the user named
    key: str = ""         # the engine's cache key for this pass
    callbacks: tuple = ()  # TrainerCallbacks for fine-tuning passes (the search's pruning hook)

    @property
    def trust_remote_code(self) -> bool:
        return self.workflow.spec.model.config.trusts_remote_code

    def overwrite(self) -> bool:
        return self.owned or bool(getattr(self.settings, "overwrite", False))


def finetune(step: Step) -> ModelRef:
    from slmops.training.finetune import finetune as run_finetune

    if step.model.onnx:
        raise UsageError(f"passes.{step.name}: cannot fine-tune an ONNX model; fine-tune the PyTorch model "
                         f"before the export pass")
    if step.model.adapter:
        raise UsageError(f"passes.{step.name}: the model already carries an adapter from an earlier pass; put a "
                         f"MergeAdapterWeights pass before this one to train on top of it")
    options = finetune_options(step.workflow.spec, step.name, step.settings, str(step.out))
    options["model_name_or_path"] = step.model.path
    if step.owned:  # our folder: an interrupted attempt of this very pass resumes, anything else is redone
        options.update(overwrite=True, resume_from_checkpoint=options.get("resume_from_checkpoint") or "auto")
    return trained_model(step.model.path, run_finetune(callbacks=step.callbacks, **options))


def trained_model(base: str, folder: Path) -> ModelRef:
    """What a finetune output folder hands on: the base plus its adapter, or its full model."""
    if (folder / "adapter").is_dir():
        return ModelRef(base, str(folder / "adapter"))
    return ModelRef(str(folder / "model"))


def merge(step: Step) -> ModelRef:
    from slmops.export.source import find_source, load_reference, trained_for
    from slmops.manifest import write_manifest
    from slmops.outputs import publish, refuse_existing, work_dir

    if step.model.adapter is None:
        raise UsageError(f"passes.{step.name}: MergeAdapterWeights needs an adapter; put it after a LoRA-style "
                         f"pass, or give model.config.adapter_path")
    refuse_existing(step.out, step.overwrite())
    source = find_source(step.model.path, step.model.adapter)
    if trained_for(source):
        log.warning("passes.%s: the adapter was trained for a %s export; merged into float weights it loses "
                    "that (export it with ModelBuilder at that precision instead)", step.name, trained_for(source))
    model, tokenizer = load_reference(source, step.trust_remote_code)  # merged in fp32
    work = work_dir(step.out)
    model.save_pretrained(work)
    tokenizer.save_pretrained(work)
    write_manifest(work / "manifest.json", "merge", {"model_name_or_path": step.model.path,
                                                     "adapter_path": step.model.adapter}, {}, {}, {})
    publish(work, step.out)
    return ModelRef(str(step.out))


def export(step: Step) -> ModelRef:
    from slmops.export.auto_opt import auto_opt

    s = step.settings
    source = _pytorch_source(step)
    device, provider = _device(step)
    precision = s.precision if step.type != "OnnxQuantization" or "precision" in s.model_fields_set else "int8"
    auto_opt(str(step.out), source.path, source.adapter, device, provider, precision, step.trust_remote_code,
             step.overwrite(), s.parity_prompts, s.exporter)
    return ModelRef(str(step.out), onnx=True, source=asdict(source))


def extract_adapters(step: Step) -> ModelRef:
    from slmops.export.multi_adapter import generate_adapter

    s = step.settings
    source = _pytorch_source(step)
    adapters = s.adapter_paths or ([source.adapter] if source.adapter else [])
    if not adapters:
        raise UsageError(f"passes.{step.name}: no adapter to extract; put it after a LoRA-style pass or give "
                         f"adapter_paths")
    device, provider = _device(step)
    generate_adapter(source.path, adapters, str(step.out), s.adapter_names, device, provider, s.precision,
                     step.trust_remote_code, step.overwrite(), s.parity_prompts)
    names = list(read_json(step.out / "manifest.json")["resolved"]["adapters"])
    # One adapter: later passes (Evaluate) use it by name; several: the plain base, as at run time.
    return ModelRef(str(step.out), names[0] if len(names) == 1 else None, onnx=True,
                    source=asdict(ModelRef(source.path)))


def evaluate(step: Step) -> ModelRef:
    from slmops.evaluation.run import evaluate as run_evaluate
    from slmops.manifest import write_manifest
    from slmops.outputs import publish, work_dir

    s = step.settings
    data = step.workflow.data(s.data_config)
    options = {k: v for k, v in data.options().items() if k not in ("eval_fraction", "max_eval_samples")}
    if s.max_samples:
        options["max_samples"] = s.max_samples
    options["eval_split"] = s.split or options.pop("train_split")
    results = run_evaluate(step.model.path, step.model.adapter, s.metrics, s.predict,
                           s.batch_size, s.max_new_tokens, progress=False,
                           trust_remote_code=step.trust_remote_code, **options)
    work = work_dir(step.out)
    (work / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    write_manifest(work / "manifest.json", "evaluate", {"model_name_or_path": step.model.path,
                                                        "adapter_path": step.model.adapter, **s.model_dump()},
                   {}, results["data"], {"metrics": results["metrics"]})
    publish(work, step.out)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in results["metrics"].items() if isinstance(v, float))
    log.info("%s: %s", step.name, shown)
    return step.model


def _pytorch_source(step: Step) -> ModelRef:
    """The PyTorch model to export: the one so far, or the one an ONNX model so far was made from."""
    if not step.model.onnx:
        return step.model
    if step.model.source is None:
        raise UsageError(f"passes.{step.name}: {step.type} exports from a PyTorch model, and the input ONNX model "
                         f"{step.model.path} does not say which one it came from; start from the PyTorch model")
    return ModelRef(**step.model.source)


def _device(step: Step) -> tuple[str, str | None]:
    device, provider = step.workflow.device()
    return step.settings.device or device, step.settings.provider or provider


PASSES: dict[str, Callable[[Step], ModelRef]] = {
    **{t: finetune for t in FINETUNE_TYPES},
    "MergeAdapterWeights": merge, "ModelBuilder": export, "OnnxConversion": export, "OnnxQuantization": export,
    "ExtractAdapters": extract_adapters, "Evaluate": evaluate,
}

# What each pass imports beyond the core install: (module to import, pip requirement).
EXPORT_NEEDS = [("onnxruntime_genai", "onnxruntime-genai>=0.11"), ("onnx_ir", "onnx-ir>=0.1.12"),
                ("onnxruntime", "onnxruntime>=1.22"), ("onnx", "onnx>=1.17")]
NEEDS: dict[str, list[tuple[str, str]]] = {
    "QLoRA": [("bitsandbytes", "bitsandbytes>=0.45")],
    **{t: EXPORT_NEEDS for t in ("ModelBuilder", "OnnxConversion", "OnnxQuantization", "ExtractAdapters")},
    "Evaluate": [("sacrebleu", "sacrebleu>=2.4"), ("rouge_score", "rouge-score>=0.1.2")],
    "search": [("optuna", "optuna>=4.0")],
}


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
