"""A workflow file in Olive's shape, validated into one `Workflow` the engine runs.

Olive's keys are accepted where a user would type them (`model.config.model_path`,
`data_configs[].load_dataset_config`, `passes.NAME.type` with settings under `config` or at
the pass's top level). Every problem is reported at once, each under its YAML path
(`passes.lora.config.r: must be a positive integer, got -4`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from slmops.config import DataConfig, FinetuneConfig
from slmops.errors import UsageError
from slmops.outputs import write_json
from slmops.workflow.schema import (ALIASES, FINETUNE_TYPES, PASS_SCHEMAS, FinetunePass, PassSpec, Workflow,
                                    WorkflowSpec)


def load_workflow(path: str) -> Workflow:
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
    return validate(raw, str(file))


def validate(raw: dict[str, Any], source: str | None = None) -> Workflow:
    problems: list[str] = []
    try:
        spec = WorkflowSpec.model_validate(raw)
    except ValidationError as err:
        problems += describe(err)
        spec = None
    passes: dict[str, BaseModel] = {}
    for name, p in (raw.get("passes") or {}).items() if isinstance(raw.get("passes"), dict) else ():
        parsed = _parse_pass(name, p, problems)
        if parsed is not None:
            passes[name] = parsed
    space = raw.get("search_space")
    allowed = search_options()
    problems += [f"search_space.{option}: the fine-tuning pass has no option {option!r}; search over its settings "
                 f"(learning_rate, lora_r, lora_alpha, lora_dropout, batch_size, target_modules, num_train_epochs, "
                 f"...)" for option in (space if isinstance(space, dict) else ()) if option not in allowed]
    if spec is not None:
        problems += _cross_checks(spec, passes)
    if problems:
        head = f"{source}: " if source else ""
        raise UsageError(head + ("; ".join(problems) if len(problems) == 1 else
                                 f"{len(problems)} problems:\n  " + "\n  ".join(problems)))
    return Workflow(spec=spec, passes=passes, source=source)


def _parse_pass(name: str, raw: Any, problems: list[str]) -> BaseModel | None:
    try:
        spec = PassSpec.model_validate(raw)
    except ValidationError:
        return None  # reported by the WorkflowSpec pass
    schema = PASS_SCHEMAS.get(spec.type)
    if schema is None:
        problems.append(f"passes.{name}.type: unknown pass type {spec.type!r}; known: {', '.join(PASS_SCHEMAS)}")
        return None
    if schema is FinetunePass:
        keys = [*spec.config, *(spec.config.get("training_args") or {})]
        problems += [f"passes.{name}.config.{k}: unknown option; use a LoRA setting (r, alpha, lora_dropout, "
                     f"target_modules, ...) or a Hugging Face TrainingArguments name"
                     for k in keys if k not in finetune_option_names()]
    try:
        return schema.model_validate(spec.config)
    except ValidationError as err:
        problems += [p for p in describe(err, f"passes.{name}.config") if not p.endswith("unknown key")]
        return None


def _cross_checks(spec: WorkflowSpec, passes: dict[str, BaseModel]) -> list[str]:
    problems = []
    if spec.model is None:
        problems.append("model: missing; give model: {type: HfModel, config: {model_path: ...}}")
    if not spec.passes:
        problems.append("passes: none given; add at least one pass (e.g. lora: {type: LoRA})")
    names = [d.name for d in spec.data_configs]
    for i, d in enumerate(spec.data_configs):
        try:
            DataConfig.build(model_name_or_path="-", **d.options())
        except UsageError as err:
            problems.append(f"data_configs[{i}] ({d.name}): {err}")
    finetunes = [n for n, p in spec.passes.items() if p.type in FINETUNE_TYPES]
    for name, p in passes.items():
        refs = {k: getattr(p, k) for k in ("train_data_config", "eval_data_config", "data_config") if hasattr(p, k)}
        for key, ref in refs.items():
            if ref is not None and ref not in names:
                problems.append(f"passes.{name}.config.{key}: no data config named {ref!r}; "
                                f"defined: {', '.join(names) or 'none'}")
        if isinstance(p, FinetunePass):
            if not names:
                problems.append(f"passes.{name}: a fine-tuning pass needs data_configs")
                continue
            if not problems and spec.model is not None:
                problems += _finetune_problems(spec, name, p)
    if spec.search_strategy is not None:
        problems += _search_problems(spec, passes, finetunes)
    elif spec.search_space:
        problems.append("search_space: given without search_strategy; add search_strategy: {type: random, "
                        "num_trials: N}")
    return problems


def finetune_options(spec: WorkflowSpec, name: str, p: FinetunePass, output_path: str) -> dict[str, Any]:
    """The `slmops finetune` options a fine-tuning pass stands for: one path from workflow to trainer."""
    train = next((d for d in spec.data_configs if d.name == p.train_data_config), spec.data_configs[0])
    model = spec.model.config
    options = {"model_name_or_path": model.model_path,
               "trust_remote_code": model.trusts_remote_code,
               **train.options(), "method": FINETUNE_TYPES[spec.passes[name].type], "output_path": output_path}
    if p.eval_data_config:
        ev = next(d for d in spec.data_configs if d.name == p.eval_data_config)
        same = {"data_name", "data_files"}
        if ev.load_dataset_config.model_dump(include=same) != train.load_dataset_config.model_dump(include=same):
            raise UsageError(f"passes.{name}.config.eval_data_config: {ev.name!r} reads other data than "
                             f"{train.name!r}; validation rows must come from the same data_name/data_files "
                             f"(another split of it)")
        options["eval_split"] = ev.load_dataset_config.split
        if ev.load_dataset_config.subset != train.load_dataset_config.subset:
            options["eval_subset"] = ev.load_dataset_config.subset
    loss = p.loss or spec.loss
    if loss is not None:
        options.update(loss=loss.type, loss_args=loss.args)
    options.update(p.options())
    return options


def _finetune_problems(spec: WorkflowSpec, name: str, p: FinetunePass) -> list[str]:
    """FinetuneConfig's own checks (bad combinations), with its --flags turned into YAML paths."""
    prefix = f"passes.{name}.config"
    try:
        FinetuneConfig(**finetune_options(spec, name, p, "-"))
    except UsageError as err:
        return [str(err)]
    except ValidationError as err:
        return [re.sub(r"--(\w+)", lambda m: f"{prefix}.{m[1]}", e["msg"].removeprefix("Value error, "))
                for e in err.errors()]
    return []


def finetune_option_names() -> set[str]:
    """What a fine-tuning pass accepts: its own settings (Olive's names too), every `slmops finetune`
    option, and every Hugging Face TrainingArguments name."""
    own = {info.alias for info in FinetunePass.model_fields.values() if info.alias} | set(FinetunePass.model_fields)
    return own | set(FinetuneConfig.model_fields) | training_argument_names()


def training_argument_names() -> set[str]:
    """TrainingArguments' option names, remembered per transformers version: importing transformers'
    trainer takes ~8 s, which a re-run that reuses every pass should not pay."""
    from importlib.metadata import version

    from slmops.models.catalog import cache_root

    memo = cache_root() / f"training-arguments-{version('transformers')}.json"
    try:
        return set(json.loads(memo.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        pass
    from transformers import TrainingArguments

    names = sorted(TrainingArguments.__dataclass_fields__)
    try:
        write_json(memo, names)
    except OSError:
        pass  # a read-only home only costs the import next time
    return set(names)


def search_options() -> set[str]:
    """Names a search space may vary: the fine-tuning pass's options, TrainingArguments, and aliases."""
    return finetune_option_names() - {"loss", "train_data_config", "eval_data_config", "training_args",
                                      "output_path", "overwrite", "resume_from_checkpoint", "model_name_or_path",
                                      "method", "logging_dir"} | set(ALIASES)


def _search_problems(spec: WorkflowSpec, passes: dict[str, BaseModel], finetunes: list[str]) -> list[str]:
    problems = []
    if not finetunes:
        problems.append("search_strategy: the workflow has no fine-tuning pass to search over")
    if not spec.search_space:
        problems.append("search_space: empty; name at least one option, e.g. learning_rate: {type: float, "
                        "low: 1e-5, high: 1e-3, log: true}")
    for option, dim in spec.search_space.items():
        if spec.search_strategy.type == "grid" and dim.type == "float" and dim.step is None:
            problems.append(f"search_space.{option}: a grid search needs `step` for a float range (or use "
                            f"type: choice)")
    return problems


def describe(err: ValidationError, prefix: str = "") -> list[str]:
    """pydantic's errors as `yaml.path: what is wrong`, one per problem."""
    out = []
    for e in err.errors():
        loc = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in e["loc"]).replace(".[", "[")
        path = ".".join(x for x in (prefix, loc) if x)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key missing"
        elif e["type"] == "literal_error":
            msg = f"got {e['input']!r}; {msg[0].lower()}{msg[1:]}"
        out.append(f"{path}: {msg}")
    return out
