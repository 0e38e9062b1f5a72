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
from slmops.models.adapters import adapter_dir, base_model_of, locate, split_spec
from slmops.options.evaluate_options import EvaluateOptions
from slmops.options.export_options import ExportOptions, ExtractAdaptersOptions, QuantizeOptions
from slmops.options.finetune_options import FinetuneOptions
from slmops.options.generate_options import GenerateOptions
from slmops.options.methods import METHODS
from slmops.options.review_options import ReviewOptions
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
    return _export(ExportOptions.build(**options), save_config_file)


def quantize(save_config_file: str | None = None, **options: Any) -> Path:
    """`auto_opt` at int4 (default) or int8, with the quantizer's settings; returns the checked folder."""
    return _export(QuantizeOptions.build(**options), save_config_file)


def _export(opts: ExportOptions, save_config_file: str | None) -> Path:
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
    from slmops.data.sources import local_files

    opts = EvaluateOptions.build(model_name_or_path=model_name_or_path, adapter_path=adapter_path, **options)
    locate(opts.model_name_or_path, opts.adapter_path)  # a wrong path is refused before torch is imported
    local_files(opts.data_name, opts.data_files)
    from slmops.evaluation.scoring import evaluate_and_save

    return evaluate_and_save(opts, progress)


def benchmark(**options: Any) -> dict[str, Any]:
    """lm-evaluation-harness tasks on one model or several (`compare`); writes them when `output_path` is given."""
    from slmops.evaluation.harness import run_benchmark
    from slmops.options.benchmark_options import BenchmarkOptions

    return run_benchmark(BenchmarkOptions.build(**options))


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


def review(**options: Any) -> Path:
    """The review folder of `slmops review` (answers generated, votes database ready); serve it with
    `slmops review -o FOLDER`."""
    return prepare_review(ReviewOptions.build(**{"serve": False, **options}))


def prepare_review(opts: ReviewOptions) -> Path:
    """Continue the review in --output_path, or make it: read the prompts, name the models, generate what the
    prompts file does not already answer, write the folder. Returns the folder."""
    from slmops.artifacts.folders import refuse_existing
    from slmops.review.collect import check_continues, create, is_review, name_models, read_prompts

    out = Path(opts.output_path or f"reviews/{Path(opts.prompts or '').stem}").expanduser()
    prompts = read_prompts(opts.prompts) if opts.prompts else []
    if is_review(out) and not opts.overwrite:
        check_continues(out, name_models(opts.models, prompts) if prompts or opts.models else None, opts.prompts)
        log.info("continuing the review in %s", out)
        return out
    if not opts.prompts:
        raise UsageError(f"no review to continue in {out}; pass --prompts FILE (and --models) to start one")
    refuse_existing(out, opts.overwrite)
    models = name_models(opts.models, prompts)
    todo = {name: [p for p in prompts if name not in p.answers] for name in models}
    # every model path checked before the first model loads
    sources = {name: locate(*split_spec(models[name])) for name, rows in todo.items() if rows}
    answers = {name: {p.key: p.answers[name] for p in prompts if name in p.answers} for name in models}
    for name, source in sources.items():
        log.info("%s: generating %d answers with %s", name, len(todo[name]), models[name])
        texts = _answers(source, [p.text for p in todo[name]], opts)
        answers[name].update(zip((p.key for p in todo[name]), texts))
    create(out, prompts, models, answers, opts.model_dump())
    return out


def _answers(source: tuple[str, Path | None, str | None], texts: list[str], opts: ReviewOptions) -> list[str]:
    """Greedy answers, in batches; with --use_chat_template each prompt is one user message."""
    from slmops.evaluation.backends import load_backend

    model, adapter, onnx_adapter = source
    backend = load_backend(model, adapter, opts.trust_remote_code, onnx_adapter)
    if opts.use_chat_template:
        texts = _chat_prompts(model, adapter, texts, opts.trust_remote_code)
    answers: list[str] = []
    for start in range(0, len(texts), opts.batch_size):
        answers += backend.generate(texts[start:start + opts.batch_size], opts.max_new_tokens)
    return [a.strip() for a in answers]


def _chat_prompts(model: str, adapter: Path | None, texts: list[str], trust_remote_code: bool) -> list[str]:
    """Each text as one user turn through the tokenizer's chat template, ready for the assistant's answer.
    A leading BOS the template writes is dropped when the tokenizer adds its own (no doubled BOS)."""
    from slmops.models.catalog import resolve
    from slmops.models.genai import is_genai_folder
    from slmops.models.tokenizers import load_tokenizer, tokenizer_folder

    folder = model if is_genai_folder(model) else tokenizer_folder(adapter, resolve(model))
    tok = load_tokenizer(folder, trust_remote_code)
    if not tok.chat_template:
        raise UsageError(f"--use_chat_template: {model}'s tokenizer has no chat template; drop the flag, or write "
                         f"the template into each prompt")
    rendered = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
                for t in texts]
    bos = tok.bos_token
    if bos and tok("x")["input_ids"][:1] == [tok.bos_token_id]:
        rendered = [r.removeprefix(bos) for r in rendered]
    return rendered
