"""Pass types by name: each has one options model (its schema) and one function that runs it.

A pass turns the model so far into a new one in its own folder, by calling the feature the matching
command calls (`finetune`, `auto-opt`, `generate-adapter`, `evaluate`) with its validated options;
each feature writes its folder completely or not at all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from slmops.errors import UsageError
from slmops.options.evaluate_options import EvaluateOptions
from slmops.options.export_options import ExportOptions, ExtractAdaptersOptions, MergeOptions
from slmops.options.fields import Options
from slmops.options.finetune_options import FinetuneOptions
from slmops.options.methods import METHODS

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
    """One pass as the engine runs it: validated options, the model so far, the folder to fill."""
    name: str
    type: str
    options: Any  # the pass type's options model, validated
    model: ModelRef
    out: Path
    owned: bool           # the folder is the engine's (under output_dir), not one the user named
    key: str = ""         # the engine's cache key for this pass
    callbacks: tuple = ()  # TrainerCallbacks for fine-tuning passes (the search's pruning hook)

    def overwrite(self) -> bool:
        return self.owned or bool(getattr(self.options, "overwrite", False))

    def with_options(self, **updates: Any) -> Any:
        return self.options.model_copy(update=updates)


def finetune(step: Step) -> ModelRef:
    from slmops.training.recipe import finetune as train

    if step.model.onnx:
        raise UsageError(f"passes.{step.name}: cannot fine-tune an ONNX model; fine-tune the PyTorch model "
                         f"before the export pass")
    updates: dict[str, Any] = {"model_name_or_path": step.model.path, "output_path": str(step.out)}
    if step.model.adapter and step.options.stage != "sft":
        updates["adapter_path"] = step.model.adapter  # SFT, then a preference stage on the same adapter
    elif step.model.adapter:
        raise UsageError(f"passes.{step.name}: the model already carries an adapter from an earlier pass; put a "
                         f"MergeAdapterWeights pass before this one to train on top of it")
    if step.owned:  # our folder: an interrupted attempt of this very pass resumes, anything else is redone
        updates.update(overwrite=True, resume_from_checkpoint=step.options.resume_from_checkpoint or "auto")
    return trained_model(step.model.path, train(step.with_options(**updates), step.callbacks))


def trained_model(base: str, folder: Path) -> ModelRef:
    """What a finetune output folder hands on: the base plus its adapter, or its full model."""
    if (folder / "adapter").is_dir():
        return ModelRef(base, str(folder / "adapter"))
    return ModelRef(str(folder / "model"))


def merge(step: Step) -> ModelRef:
    from slmops.export.merge import merge as merge_adapter

    if step.model.adapter is None:
        raise UsageError(f"passes.{step.name}: MergeAdapterWeights needs an adapter; put it after a LoRA-style "
                         f"pass, or give model.config.adapter_path")
    merge_adapter(step.with_options(model_name_or_path=step.model.path, adapter_path=step.model.adapter,
                                    output_path=str(step.out), overwrite=step.overwrite()))
    return ModelRef(str(step.out))


def export(step: Step) -> ModelRef:
    from slmops.export.auto_opt import auto_opt

    source = _pytorch_source(step)
    auto_opt(step.with_options(model_name_or_path=source.path, adapter_path=source.adapter,
                               output_path=str(step.out), overwrite=step.overwrite()))
    return ModelRef(str(step.out), onnx=True, source=vars(source).copy())


def extract_adapters(step: Step) -> ModelRef:
    from slmops.artifacts.folders import read_json
    from slmops.export.multi_adapter import generate_adapter

    source = _pytorch_source(step)
    adapters = step.options.adapter_paths or ([source.adapter] if source.adapter else [])
    if not adapters:
        raise UsageError(f"passes.{step.name}: no adapter to extract; put it after a LoRA-style pass or give "
                         f"adapter_paths")
    generate_adapter(step.with_options(base_model_path=source.path, adapter_paths=adapters,
                                       output_path=str(step.out), overwrite=step.overwrite()))
    names = list(read_json(step.out / "manifest.json")["resolved"]["adapters"])
    # One adapter: later passes (Evaluate) use it by name; several: the plain base, as at run time.
    return ModelRef(str(step.out), names[0] if len(names) == 1 else None, onnx=True,
                    source=vars(ModelRef(source.path)).copy())


def evaluate(step: Step) -> ModelRef:
    from slmops.evaluation.scoring import evaluate_and_save

    options = step.with_options(model_name_or_path=step.model.path, adapter_path=step.model.adapter,
                                output_path=str(step.out))
    results = evaluate_and_save(options, progress=False)
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


# What each pass imports beyond the core install: (module to import, pip requirement).
EXPORT_NEEDS = (("onnxruntime_genai", "onnxruntime-genai>=0.11"), ("onnx_ir", "onnx-ir>=0.1.12"),
                ("onnxruntime", "onnxruntime>=1.22"), ("onnx", "onnx>=1.17"))
SEARCH_NEEDS = (("optuna", "optuna>=4.9"),)
POSTGRES_NEEDS = (("psycopg", "psycopg[binary]>=3.2"),)  # a search_strategy.storage on PostgreSQL


@dataclass(frozen=True)
class PassType:
    """A workflow pass type: its options (the schema of its `config`) and what runs it."""
    options: type[Options]
    run: Callable[[Step], ModelRef]
    needs: tuple[tuple[str, str], ...] = ()
    ignored: frozenset[str] = frozenset()  # Olive's settings that have no effect here (accepted, logged)
    defaults: dict[str, Any] = field(default_factory=dict)  # this type's defaults where they differ


# Olive's settings with no effect here: placement and precision of a GPU run (our device choice is
# automatic), torch.onnx's own settings (the builder chooses its opset), and ExtractAdapters' layout
# choices (slmops always makes inputs with rank-0 defaults).
FINETUNE_IGNORED = frozenset({"device_map", "allow_tf32", "ephemeral_gpu_offload", "compute_dtype",
                              "save_quant_config"})
EXPORT_IGNORED = frozenset({"target_opset", "save_as_external_data", "all_tensors_to_one_file"})
EXTRACT_IGNORED = EXPORT_IGNORED | {"adapter_type", "make_inputs", "dynamic_lora_r", "optional_inputs",
                                    "save_format"}

OTHER_TYPES: dict[str, PassType] = {
    "MergeAdapterWeights": PassType(MergeOptions, merge),
    "ModelBuilder": PassType(ExportOptions, export, EXPORT_NEEDS, EXPORT_IGNORED),
    "OnnxConversion": PassType(ExportOptions, export, EXPORT_NEEDS, EXPORT_IGNORED),
    "OnnxQuantization": PassType(ExportOptions, export, EXPORT_NEEDS, EXPORT_IGNORED, {"precision": "int8"}),
    "ExtractAdapters": PassType(ExtractAdaptersOptions, extract_adapters, EXPORT_NEEDS, EXTRACT_IGNORED),
    "Evaluate": PassType(EvaluateOptions, evaluate, (("sacrebleu", "sacrebleu>=2.4"),
                                                     ("rouge_score", "rouge-score>=0.1.2"))),
}


# Preference stages as pass types (TRL's names): `type: DPO` with `method: lora` (the default) and so on in its
# config; after a LoRA-style pass it goes on training that pass's adapter.
STAGE_TYPES = {"DPO": "dpo", "ORPO": "orpo", "KTO": "kto"}


def pass_types() -> dict[str, PassType]:
    """Every pass type by name: one fine-tuning type per registered method, one per preference stage, then
    the others."""
    return {**{m.pass_type: PassType(FinetuneOptions, finetune, (("bitsandbytes", "bitsandbytes>=0.45"),)
                                     if m.quantized else (), FINETUNE_IGNORED, {"method": m.name})
               for m in METHODS.values()},
            **{name: PassType(FinetuneOptions, finetune, (), FINETUNE_IGNORED, {"stage": stage})
               for name, stage in STAGE_TYPES.items()}, **OTHER_TYPES}


def is_finetune(pass_type: str) -> bool:
    kind = pass_types().get(pass_type)
    return kind is not None and kind.options is FinetuneOptions


@dataclass
class PassPlan:
    """A pass as loaded: its type, its validated options and its folder."""
    type: str
    options: Any
    folder: Path
    owned: bool  # the folder is the engine's (OUTPUT_DIR/NAME), not an output_path the user named
    callbacks: tuple = ()  # a fine-tuning pass's extra TrainerCallbacks (the Python API takes them)


@dataclass
class Workflow:
    """A validated workflow: the input model, the passes in order, and the search over the first
    fine-tuning pass when there is one. Built from a file (`slmops.workflow.reading`) or by a command."""
    model: ModelRef
    passes: dict[str, PassPlan]
    output_dir: Path
    trust_remote_code: bool = False
    search: Any = None  # the file's search_strategy
    space: dict[str, Any] = field(default_factory=dict)  # its search_space
    source: str | None = None  # the file it came from

    @classmethod
    def single(cls, name: str, pass_type: str, options: Any, model: ModelRef, callbacks: tuple = ()) -> Workflow:
        """What a command (`finetune`, `auto-opt`, `generate-adapter`) runs: one pass into its --output_path."""
        folder = Path(options.output_path).expanduser()
        return cls(model, {name: PassPlan(pass_type, options, folder, False, tuple(callbacks))}, folder.parent,
                   bool(getattr(options, "trust_remote_code", False)))

    def searched_pass(self) -> str | None:
        """The pass a search_strategy searches: the first fine-tuning pass."""
        if self.search is None:
            return None
        return next((n for n, p in self.passes.items() if is_finetune(p.type)), None)
