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
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from slmops.config import DataConfig, FinetuneConfig
from slmops.errors import UsageError


def _positive(v: float) -> float:
    if v <= 0:
        raise ValueError(f"must be a positive {'integer' if isinstance(v, int) else 'number'}, got {v}")
    return v


def _fraction(v: float) -> float:
    if not 0 <= v < 1:
        raise ValueError(f"must lie in [0, 1), got {v}")
    return v


PosInt = Annotated[int, AfterValidator(_positive)]
PosFloat = Annotated[float, AfterValidator(_positive)]
Dropout = Annotated[float, AfterValidator(_fraction)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Typed(Strict):
    """A section with a `type` and its settings; Olive also lets the settings sit beside `type`
    instead of under `config`, so those move under `config`."""

    @model_validator(mode="before")
    @classmethod
    def _settings_at_top(cls, data: Any) -> Any:
        if isinstance(data, dict):
            top = {k: v for k, v in data.items() if k not in ("type", "config")}
            if top:
                data = {k: v for k, v in data.items() if k in ("type", "config")}
                data["config"] = {**top, **(data.get("config") or {})}
        return data


# ---- model -------------------------------------------------------------------------------------

class LoadKwargs(Strict):
    trust_remote_code: bool = False


class ModelPaths(Strict):
    model_path: str
    adapter_path: str | None = None
    task: str = "text-generation"
    trust_remote_code: bool = False
    load_kwargs: LoadKwargs = LoadKwargs()


class ModelSpec(Typed):
    type: Literal["PyTorchModel", "HfModel", "OnnxModel"] = "HfModel"
    config: ModelPaths


# ---- data --------------------------------------------------------------------------------------

class LoadDataset(Strict):
    data_name: str | None = None
    data_files: str | list[str] | None = None
    split: str = "train"
    subset: str | None = None
    trust_remote_code: bool | None = None  # Olive passes it to load_dataset; we never run dataset scripts


class PreProcess(Strict):
    text_template: str | None = None
    text_field: str | None = None
    use_chat_template: bool = False
    max_seq_len: PosInt = 1024
    max_samples: PosInt | None = None
    train_on_prompt: bool = False
    add_eos: bool = True
    eval_fraction: float = 0.1
    max_eval_samples: PosInt = 1000
    # Olive's text-container options; slmops keeps one row per example and pads nothing, so these
    # have no effect (documented in docs/workflows.md).
    strategy: str | None = None
    add_special_tokens: bool | None = None
    pad_to_max_len: bool | None = None
    use_attention_mask: bool | None = None


class DataSpec(Strict):
    name: str
    type: Literal["HuggingfaceContainer"] = "HuggingfaceContainer"
    load_dataset_config: LoadDataset = LoadDataset()
    pre_process_data_config: PreProcess = PreProcess()
    dataloader_config: dict[str, Any] = {}         # Olive's evaluation loader; ignored
    post_process_data_config: dict[str, Any] = {}  # ignored

    def options(self) -> dict[str, Any]:
        """This data config as `slmops.config.DataConfig` options (the split is the training split)."""
        load, pre = self.load_dataset_config, self.pre_process_data_config
        files = [load.data_files] if isinstance(load.data_files, str) else load.data_files
        return {"data_name": load.data_name, "data_files": files, "train_split": load.split,
                "train_subset": load.subset, **pre.model_dump(include=set(DataConfig.model_fields))}


# ---- search ------------------------------------------------------------------------------------

class SearchStrategy(Strict):
    type: Literal["random", "tpe", "grid"] = Field("tpe", alias="sampler")
    num_trials: PosInt = Field(10, alias="max_samples")
    seed: int = 0
    max_time: PosFloat | None = None  # seconds for the whole study
    metric: str = "eval_loss"
    direction: Literal["minimize", "maximize"] | None = None
    storage: str | None = None        # SQLAlchemy URL; default: sqlite file in the pass folder
    study_name: str | None = None
    pruning: bool = True
    execution_order: str | None = None  # Olive's; one pass is searched, so it has no effect

    @property
    def goal(self) -> str:
        return self.direction or ("minimize" if self.metric.endswith("loss") else "maximize")


class Dimension(Strict):
    type: Literal["float", "int", "choice", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> Dimension:
        if self.type in ("choice", "categorical"):
            if not self.values:
                raise ValueError("a choice needs a non-empty `values` list")
        elif self.low is None or self.high is None:
            raise ValueError(f"a {self.type} range needs `low` and `high`")
        elif self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}")
        elif self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0, got {self.low}")
        return self


class LossSpec(Strict):
    type: str = "cross_entropy"
    args: dict[str, Any] = {}


# ---- passes ------------------------------------------------------------------------------------

class PassSpec(Typed):
    type: str
    config: dict[str, Any] = {}


class FinetunePass(Strict):
    """A fine-tuning pass: slmops's finetune options, under Olive's names where they differ. Any other
    `slmops finetune` option or TrainingArguments name is accepted too (checked after parsing)."""
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    lora_r: PosInt | None = Field(None, alias="r")
    lora_alpha: PosFloat | None = Field(None, alias="alpha")
    lora_dropout: Dropout | None = None
    target_modules: list[str] | None = None
    modules_to_save: list[str] | None = None
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    packing: bool | None = None
    merge: bool | None = None
    early_stopping_patience: PosInt | None = None
    eval_metrics: list[str] | None = None
    task_name: str | None = None
    seed: int | None = None
    loss: LossSpec | None = None
    train_data_config: str | None = None
    eval_data_config: str | None = None
    training_args: dict[str, Any] = {}
    output_path: str | None = None
    overwrite: bool | None = None
    resume_from_checkpoint: str | None = None
    logging_dir: str | None = None
    # Olive's, for placement and precision of a GPU run; our device choice is automatic
    device_map: Any = None
    allow_tf32: bool | None = None
    ephemeral_gpu_offload: bool | None = None
    compute_dtype: str | None = None
    save_quant_config: bool | None = None

    def options(self) -> dict[str, Any]:
        """FinetuneConfig options (without model and data), TrainingArguments extras folded in."""
        own = self.model_dump(exclude_none=True, exclude={"loss", "train_data_config", "eval_data_config",
                                                          "training_args", "device_map", "allow_tf32",
                                                          "ephemeral_gpu_offload", "compute_dtype",
                                                          "save_quant_config"})
        extras = {k: own.pop(k) for k in list(own) if k not in FinetuneConfig.model_fields}
        if self.loss is not None:
            own.update(loss=self.loss.type, loss_args=self.loss.args)
        return {**own, "training_args": {**self.training_args, **extras}}


class ExportPass(Strict):
    """ModelBuilder / OnnxConversion: an ONNX Runtime GenAI folder checked for parity."""
    precision: Literal["fp32", "fp16", "int8", "int4"] = "fp32"
    device: Literal["cpu", "gpu"] | None = None
    provider: str | None = None
    parity_prompts: PosInt = 16
    output_path: str | None = None
    overwrite: bool = False
    # OnnxConversion's torch.onnx settings; the builder chooses its own opset
    target_opset: int | None = None
    save_as_external_data: bool | None = None
    all_tensors_to_one_file: bool | None = None


class ExtractAdaptersPass(ExportPass):
    """One ONNX base with LoRA weights as inputs, one .onnx_adapter per adapter."""
    adapter_paths: list[str] | None = None   # default: the adapter the workflow has trained so far
    adapter_names: list[str] | None = None
    parity_prompts: PosInt = 8
    # Olive's ExtractAdapters options; slmops always makes inputs with rank-0 defaults
    adapter_type: str | None = None
    make_inputs: bool | None = None
    dynamic_lora_r: bool | None = None
    optional_inputs: bool | None = None
    save_format: str | None = None


class MergePass(Strict):
    output_path: str | None = None
    overwrite: bool = False


class EvaluatePass(Strict):
    data_config: str | None = None  # default: the workflow's first data config
    split: str | None = None        # default: that data config's split
    metrics: list[str] | None = None
    predict: Literal["likelihood", "generate"] = "likelihood"
    batch_size: PosInt = 16
    max_new_tokens: PosInt | None = None
    max_samples: PosInt | None = None


FINETUNE_TYPES = {"LoRA": "lora", "QLoRA": "qlora", "DoRA": "dora", "LoHa": "loha", "LoKr": "lokr",
                  "IA3": "ia3", "FullFineTune": "full"}
PASS_SCHEMAS: dict[str, type[BaseModel]] = {
    **{t: FinetunePass for t in FINETUNE_TYPES},
    "MergeAdapterWeights": MergePass, "ModelBuilder": ExportPass, "OnnxConversion": ExportPass,
    "OnnxQuantization": ExportPass, "ExtractAdapters": ExtractAdaptersPass, "Evaluate": EvaluatePass,
}


# ---- the workflow ------------------------------------------------------------------------------

class Accelerator(Strict):
    device: Literal["cpu", "gpu", "CPU", "GPU"] = "cpu"
    execution_providers: list[str] | None = None


class SystemSpec(Strict):
    type: Literal["LocalSystem"] = "LocalSystem"
    accelerators: list[Accelerator] = []
    config: dict[str, Any] = {}


class EngineSpec(Strict):
    output_dir: str | None = None
    cache_dir: str | None = None
    log_severity_level: int | None = None
    evaluate_input_model: bool | None = None
    host: str | None = None
    target: str | None = None


class WorkflowSpec(Strict):
    model: ModelSpec | None = Field(None, alias="input_model")
    data_configs: list[DataSpec] = []
    passes: dict[str, PassSpec] = {}
    search_strategy: SearchStrategy | None = None
    search_space: dict[str, Dimension] = {}
    loss: LossSpec | None = None
    output_dir: str | None = None
    engine: EngineSpec = EngineSpec()
    systems: dict[str, SystemSpec] = {}
    host: str | None = None
    target: str | None = None
    # Olive's bookkeeping keys; nothing to do with them here
    cache_dir: str | None = None
    log_severity_level: int | None = None
    evaluate_input_model: bool | None = None
    no_artifacts: bool | None = None
    workflow_id: str | None = None


class Workflow(BaseModel):
    """A validated workflow: the spec plus each pass's settings parsed for its type."""
    spec: WorkflowSpec
    passes: dict[str, BaseModel]
    source: str | None = None  # the file it came from

    @property
    def output_dir(self) -> Path:
        chosen = self.spec.output_dir or self.spec.engine.output_dir
        if chosen:
            return Path(chosen).expanduser()
        return Path("runs") / (Path(self.source).stem if self.source else "workflow")

    def data(self, name: str | None) -> DataSpec:
        if not self.spec.data_configs:
            raise UsageError("the workflow has no data_configs")
        return next(d for d in self.spec.data_configs if name in (None, d.name))

    def device(self) -> tuple[str, str | None]:
        """(device, provider) of the `target` system (Olive's `systems`), default cpu."""
        name = self.spec.target or self.spec.engine.target
        system = self.spec.systems.get(name) if name else next(iter(self.spec.systems.values()), None)
        if system is None or not system.accelerators:
            return "cpu", None
        acc = system.accelerators[0]
        return acc.device.lower(), (acc.execution_providers or [None])[0]


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
               "trust_remote_code": model.trust_remote_code or model.load_kwargs.trust_remote_code,
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
    from transformers import TrainingArguments

    own = {info.alias for info in FinetunePass.model_fields.values() if info.alias} | set(FinetunePass.model_fields)
    return own | set(FinetuneConfig.model_fields) | set(TrainingArguments.__dataclass_fields__)


def search_options() -> set[str]:
    """Names a search space may vary: the fine-tuning pass's options, TrainingArguments, and aliases."""
    return finetune_option_names() - {"loss", "train_data_config", "eval_data_config", "training_args",
                                      "output_path", "overwrite", "resume_from_checkpoint", "model_name_or_path",
                                      "method", "logging_dir"} | set(ALIASES)


ALIASES = {"batch_size": "per_device_train_batch_size", "epochs": "num_train_epochs"}


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
