"""The Python API: one function per command, taking the command's options as keywords.

Each builds the command's options model (validated once, as the CLI does) and runs it through the
same engine as `slmops run --config`, so `slmops.finetune(...)` records `pass.json` and is reused
or resumed exactly like the command.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

from slmops.errors import UsageError
from slmops.models.adapters import adapter_dir, base_model_of
from slmops.options.evaluate_options import EvaluateOptions
from slmops.options.export_options import ExportOptions, ExtractAdaptersOptions
from slmops.options.finetune_options import FinetuneOptions
from slmops.options.generate_options import GenerateOptions
from slmops.options.methods import METHODS
from slmops.workflow.engine import run_workflow
from slmops.workflow.reading import load_workflow, validate
from slmops.workflow.passes import ModelRef, Workflow

log = logging.getLogger(__name__)


def finetune(callbacks: Sequence[Any] = (), save_config_file: str | None = None, **options: Any) -> Path:
    """Fine-tune a model; returns the output folder. Options are `slmops finetune`'s flags, and any
    Hugging Face TrainingArguments name: `finetune(model_name_or_path=..., data_name=...,
    text_template=..., output_path=..., max_steps=100, learning_rate=1e-4)`; `callbacks` are extra
    TrainerCallbacks; `save_config_file` also writes the workflow file that reruns it."""
    opts = FinetuneOptions.build(**options)
    model = ModelRef(opts.model_name_or_path)
    return _one_pass("finetune", METHODS[opts.method].pass_type, opts, model, save_config_file, callbacks)


def auto_opt(save_config_file: str | None = None, **options: Any) -> Path:
    """Export a model (plus adapter) to an ONNX Runtime GenAI folder checked for parity; returns it."""
    opts = ExportOptions.build(**options)
    base = opts.model_name_or_path or base_model_of(adapter_dir(opts.adapter_path))  # `auto-opt -a ADAPTER`
    return _one_pass("export", "ModelBuilder", opts, ModelRef(base, opts.adapter_path), save_config_file)


def generate_adapter(save_config_file: str | None = None, **options: Any) -> Path:
    """One ONNX base model plus one .onnx_adapter file per LoRA adapter; returns the folder."""
    opts = ExtractAdaptersOptions.build(**options)
    if not opts.adapter_paths:
        raise UsageError("--adapter_paths: give one or more adapter folders (or finetune output folders), "
                         "comma-separated")
    return _one_pass("export", "ExtractAdapters", opts, ModelRef(opts.base_model_path), save_config_file)


def _one_pass(name: str, pass_type: str, opts: Any, model: ModelRef, save_config_file: str | None,
              callbacks: Sequence[Any] = ()) -> Path:
    """A command's single pass, written into its --output_path by the engine."""
    run_command(Workflow.single(name, pass_type, opts, model, tuple(callbacks)), save_config_file)
    return Path(opts.output_path).expanduser()


def evaluate(model_name_or_path: str | None = None, adapter_path: str | None = None, *, progress: bool = True,
             **options: Any) -> dict[str, Any]:
    """Metrics of a model (plus adapter) on one split; writes them when `output_path` is given."""
    from slmops.evaluation.scoring import evaluate_and_save

    opts = EvaluateOptions.build(model_name_or_path=model_name_or_path, adapter_path=adapter_path, **options)
    return evaluate_and_save(opts, progress)


def generate(prompt: str, on_text: Callable[[str], None] | None = None, **options: Any) -> str:
    """The model's continuation of `prompt`; `on_text` receives it piece by piece."""
    from slmops.generation import generate as continue_text

    return continue_text(GenerateOptions.build(prompt=prompt, **options), on_text)


def run(config: str | Path | dict[str, Any], search_only: bool = False, output_dir: str | None = None) -> ModelRef:
    """`slmops run --config`: a workflow file (or the same as a dict) run to its final model."""
    wf = validate(config, output_dir=output_dir) if isinstance(config, dict) else \
        load_workflow(str(config), output_dir)
    return run_workflow(wf, search_only)


def run_command(wf: Workflow, save_config_file: str | None = None) -> ModelRef:
    """What a command does once its options are valid: optionally save its workflow file, then run it."""
    if save_config_file:
        from slmops.workflow.writing import save_config

        log.info("wrote %s (run it with: slmops run --config %s)", save_config(wf, save_config_file),
                 save_config_file)
    return run_workflow(wf)
