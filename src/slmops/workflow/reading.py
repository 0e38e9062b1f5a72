"""A workflow file in Olive's shape, validated into the `Workflow` the engine runs.

Each pass's settings are the options of its pass type (`slmops.options`), gathered from where Olive
puts them: the model from `model.config`, the data from `data_configs[]` (`load_dataset_config`,
`pre_process_data_config`), the rest from `passes.NAME.config` (or beside `type`). The options model
validates them once; every problem is reported at once under its YAML path
(`passes.lora.config.r: must be a positive integer, got -4`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from slmops.errors import UsageError
from slmops.options.fields import describe, fields_in, olive_names
from slmops.options.finetune_options import DataOptions, FinetuneOptions
from slmops.options.training_args import training_argument_names
from slmops.workflow.passes import ModelRef, PassPlan, PassType, Workflow, is_finetune, pass_types
from slmops.workflow.schema import (DataSpec, Dimension, ModelPaths, ModelSpec, PassSpec, SearchStrategy,
                                    WorkflowSpec)

log = logging.getLogger(__name__)

# Search-space names for TrainingArguments options, as users say them.
ALIASES = {"batch_size": "per_device_train_batch_size", "epochs": "num_train_epochs"}
DATA_REFS = ("train_data_config", "eval_data_config", "data_config")
LOADED = ("data_name", "data_files", "train_split", "train_subset", "eval_split", "eval_subset")
# Olive's text-container options; slmops keeps one row per example and pads nothing, so these have no effect.
PRE_PROCESS_IGNORED = frozenset({"strategy", "add_special_tokens", "pad_to_max_len", "use_attention_mask"})
NOT_SEARCHED = {"model_name_or_path", "trust_remote_code", "method", "output_path", "overwrite", "loss",
                "loss_args", "resume_from_checkpoint", "logging_dir", "training_args"}


def load_workflow(path: str, output_dir: str | None = None) -> Workflow:
    """Read and validate a workflow file (YAML or JSON); every problem in one UsageError."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UsageError(f"config file not found: {path}; check the path")
    text = file.read_text(encoding="utf-8")
    try:
        raw = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: JSON syntax error at line {err.lineno}, column {err.colno}: {err.msg}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UsageError(f"{path}: YAML syntax error{where}: {getattr(err, 'problem', None) or err}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: expected a mapping with model, data_configs and passes at the top")
    return validate(raw, str(file), output_dir)


def validate(raw: dict[str, Any], source: str | None = None, output_dir: str | None = None) -> Workflow:
    problems: list[str] = []
    try:
        spec = WorkflowSpec.model_validate(raw)
    except ValidationError as err:
        problems += describe(err, str, unknown="unknown key")
        spec = _lenient(raw)  # still check each pass, so every problem is reported at once
    problems += _structure_problems(spec, raw)
    chosen = output_dir or spec.output_dir or spec.engine.output_dir
    out_dir = Path(chosen).expanduser() if chosen else Path("runs") / (Path(source).stem if source else "workflow")
    plans: dict[str, PassPlan] = {}
    if spec.model is not None:
        for name, p in spec.passes.items():
            plan = _plan(spec, name, p, out_dir, problems)
            if plan is not None:
                plans[name] = plan
    problems += _search_problems(spec, plans)
    if problems:
        head = f"{source}: " if source else ""
        raise UsageError(head + ("; ".join(problems) if len(problems) == 1 else
                                 f"{len(problems)} problems:\n  " + "\n  ".join(problems)))
    cfg = spec.model.config
    model = ModelRef(cfg.model_path, onnx=True) if spec.model.type == "OnnxModel" else \
        ModelRef(cfg.model_path, cfg.adapter_path)
    return Workflow(model, plans, out_dir, cfg.trusts_remote_code, spec.search_strategy, spec.search_space, source)


def _lenient(raw: dict[str, Any]) -> WorkflowSpec:
    """The sections of a file that failed validation that are valid on their own."""
    parts: dict[str, Any] = {}
    model = _parsed(ModelSpec, _known_model_keys(raw.get("model", raw.get("input_model"))))
    if model is not None:
        parts["model"] = model
    parts["data_configs"] = [d for d in map(lambda d: _parsed(DataSpec, d), raw.get("data_configs") or []) if d]
    passes = raw.get("passes") if isinstance(raw.get("passes"), dict) else {}
    parts["passes"] = {k: v for k, v in ((k, _parsed(PassSpec, v)) for k, v in passes.items()) if v is not None}
    space = raw.get("search_space") if isinstance(raw.get("search_space"), dict) else {}
    parts["search_space"] = {k: v for k, v in ((k, _parsed(Dimension, v)) for k, v in space.items()) if v}
    parts["search_strategy"] = _parsed(SearchStrategy, raw.get("search_strategy"))
    return WorkflowSpec.model_construct(**{**dict(WorkflowSpec()), **parts})


def _known_model_keys(data: Any) -> Any:
    """A model section without its unknown keys (reported already), to check the passes against it."""
    if not isinstance(data, dict):
        return data
    settings = {**{k: v for k, v in data.items() if k not in ("type", "config")}, **(data.get("config") or {})}
    return {**({"type": data["type"]} if "type" in data else {}),
            "config": {k: v for k, v in settings.items() if k in ModelPaths.model_fields}}


def _parsed(kind: Any, data: Any) -> Any:
    try:
        return kind.model_validate(data)
    except ValidationError:
        return None


def _structure_problems(spec: WorkflowSpec, raw: dict[str, Any]) -> list[str]:
    problems = []
    if spec.model is None and "model" not in raw and "input_model" not in raw:
        problems.append("model: missing; give model: {type: HfModel, config: {model_path: ...}}")
    if not spec.passes:
        problems.append("passes: none given; add at least one pass (e.g. lora: {type: LoRA})")
    for name, p in spec.passes.items():
        if p.type not in pass_types():
            problems.append(f"passes.{name}.type: unknown pass type {p.type!r}; known: {', '.join(pass_types())}")
    return problems


def _plan(spec: WorkflowSpec, name: str, p: PassSpec, out_dir: Path, problems: list[str]) -> PassPlan | None:
    """One pass's options, gathered from the file and validated by its pass type's options model."""
    kind = pass_types().get(p.type)
    if kind is None:
        return None
    given: dict[str, Any] = {}
    where: dict[str, str] = {}

    def put(key: str, value: Any, path: str) -> None:
        given[key], where[key] = value, path

    _model_options(spec, kind, put)
    if issubclass(kind.options, DataOptions):
        if not _data_options(spec, name, p, kind, put, problems):
            return None
    if spec.loss is not None and is_finetune(p.type) and "loss" not in p.config:
        put("loss", spec.loss.model_dump(), "loss")
    for key, value in p.config.items():
        if key in kind.ignored:
            log.info("passes.%s.config.%s: Olive's setting, no effect in slmops", name, key)
        elif key not in DATA_REFS:
            put(key, value, f"passes.{name}.config.{key}")
    for key, value in kind.defaults.items():
        given.setdefault(key, value)
    if "device" in kind.options.model_fields:
        device, provider = _device(spec)
        given.setdefault("device", device)
        if provider is not None:
            given.setdefault("provider", provider)
    explicit = p.config.get("output_path")
    folder = Path(explicit).expanduser() if explicit else out_dir / name
    given.setdefault("output_path", str(folder))
    try:
        options = kind.options.model_validate(given)
    except ValidationError as err:
        aliases = {ours: theirs for theirs, ours in olive_names(kind.options).items()}
        problems += describe(err, lambda k: where.get(k) or where.get(aliases.get(k, ""))
                             or f"passes.{name}.config.{k}")
        return None
    return PassPlan(p.type, options, folder, explicit is None)


def _model_options(spec: WorkflowSpec, kind: PassType, put: Any) -> None:
    cfg, fields = spec.model.config, kind.options.model_fields
    for ours, theirs, value in (("model_name_or_path", "model_path", cfg.model_path),
                                ("base_model_path", "model_path", cfg.model_path),
                                ("adapter_path", "adapter_path", cfg.adapter_path),
                                ("trust_remote_code", "trust_remote_code", cfg.trusts_remote_code)):
        if ours in fields and value is not None:
            put(ours, value, f"model.config.{theirs}")


def _data_options(spec: WorkflowSpec, name: str, p: PassSpec, kind: PassType, put: Any,
                  problems: list[str]) -> bool:
    """The data config(s) a pass reads, as options; False when it has none to read."""
    names = [d.name for d in spec.data_configs]
    if not names:
        problems.append(f"passes.{name}: a {'fine-tuning' if is_finetune(p.type) else p.type} pass needs "
                        f"data_configs")
        return False
    for ref in DATA_REFS:
        if p.config.get(ref) is not None and p.config[ref] not in names:
            problems.append(f"passes.{name}.config.{ref}: no data config named {p.config[ref]!r}; "
                            f"defined: {', '.join(names)}")
    evaluating = not is_finetune(p.type)
    wanted = p.config.get("data_config" if evaluating else "train_data_config")
    i = names.index(wanted) if wanted in names else 0
    data, at = spec.data_configs[i], f"data_configs[{i}]"
    load = data.load_dataset_config
    for ours, value, key in (("data_name", load.data_name, "data_name"), ("data_files", data.files, "data_files"),
                             ("eval_split" if evaluating else "train_split", load.split, "split"),
                             ("train_subset", load.subset, "subset")):
        if value is not None:
            put(ours, value, f"{at}.load_dataset_config.{key}")
    allowed = set(fields_in(kind.options, "data")) - set(LOADED)
    for key, value in data.pre_process_data_config.items():
        if key in PRE_PROCESS_IGNORED:
            continue
        if key not in allowed:
            problems.append(f"{at}.pre_process_data_config.{key}: unknown key")
        else:
            put(key, value, f"{at}.pre_process_data_config.{key}")
    ev = p.config.get("eval_data_config")
    if not evaluating and ev in names:
        other = spec.data_configs[names.index(ev)]
        if (other.load_dataset_config.data_name, other.files) != (load.data_name, data.files):
            problems.append(f"passes.{name}.config.eval_data_config: {ev!r} reads other data than {data.name!r}; "
                            f"validation rows must come from the same data_name/data_files (another split of it)")
        put("eval_split", other.load_dataset_config.split, f"data_configs[{names.index(ev)}].load_dataset_config"
                                                          f".split")
        if other.load_dataset_config.subset != load.subset:
            put("eval_subset", other.load_dataset_config.subset, f"data_configs[{names.index(ev)}]"
                                                                 f".load_dataset_config.subset")
    return True


def _device(spec: WorkflowSpec) -> tuple[str, str | None]:
    """(device, provider) of the `target` system (Olive's `systems`), default cpu."""
    name = spec.target or spec.engine.target
    system = spec.systems.get(name) if name else next(iter(spec.systems.values()), None)
    if system is None or not system.accelerators:
        return "cpu", None
    acc = system.accelerators[0]
    return acc.device.lower(), (acc.execution_providers or [None])[0]


def search_options() -> set[str]:
    """Names a search space may vary: the fine-tuning options (Olive's names too), TrainingArguments
    names, and the short aliases users say (batch_size, epochs)."""
    ours = set(FinetuneOptions.model_fields) | set(olive_names(FinetuneOptions))
    return (ours - NOT_SEARCHED) | training_argument_names() | set(ALIASES)


def _search_problems(spec: WorkflowSpec, plans: dict[str, PassPlan]) -> list[str]:
    allowed = search_options()
    problems = [f"search_space.{option}: the fine-tuning pass has no option {option!r}; search over its settings "
                f"(learning_rate, lora_r, lora_alpha, lora_dropout, batch_size, target_modules, num_train_epochs, "
                f"...)" for option in spec.search_space if option not in allowed]
    if spec.search_strategy is None:
        if spec.search_space:
            problems.append("search_space: given without search_strategy; add search_strategy: {type: random, "
                            "num_trials: N}")
        return problems
    if not any(is_finetune(p.type) for p in spec.passes.values()):
        problems.append("search_strategy: the workflow has no fine-tuning pass to search over")
    if not spec.search_space:
        problems.append("search_space: empty; name at least one option, e.g. learning_rate: {type: float, "
                        "low: 1e-5, high: 1e-3, log: true}")
    for option, dim in spec.search_space.items():
        if spec.search_strategy.type == "grid" and dim.type == "float" and dim.step is None:
            problems.append(f"search_space.{option}: a grid search needs `step` for a float range (or use "
                            f"type: choice)")
    return problems
