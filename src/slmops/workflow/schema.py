"""The schema of a workflow file: Olive's shape, each section a strict pydantic model.

Unknown keys are errors; Olive's keys that have no effect here are accepted and listed as such in
docs/workflows.md, so a config written for Olive loads unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

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

    @property
    def trusts_remote_code(self) -> bool:
        """Olive puts it under load_kwargs; either place turns it on."""
        return self.trust_remote_code or self.load_kwargs.trust_remote_code


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
    """`slmops finetune`'s data options; unset ones take DataConfig's defaults (kept in one place)."""
    text_template: str | None = None
    text_field: str | None = None
    use_chat_template: bool | None = None
    max_seq_len: PosInt | None = None
    max_samples: PosInt | None = None
    train_on_prompt: bool | None = None
    add_eos: bool | None = None
    eval_fraction: float | None = None
    max_eval_samples: PosInt | None = None
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
                "train_subset": load.subset,
                **pre.model_dump(include=set(DataConfig.model_fields), exclude_none=True)}


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
    exporter: Literal["auto", "builder", "torch"] = "auto"
    # OnnxConversion's torch.onnx settings; the builder chooses its own opset
    target_opset: int | None = None
    save_as_external_data: bool | None = None
    all_tensors_to_one_file: bool | None = None


class ExtractAdaptersPass(ExportPass):
    """One ONNX base with LoRA weights as inputs, one .onnx_adapter per adapter."""
    adapter_paths: list[str] | None = None   # default: the adapter the workflow has trained so far
    adapter_names: list[str] | None = None
    parity_prompts: PosInt = 8
    exporter: Literal["auto", "builder"] = "auto"  # LoRA as graph inputs: the builder's graph only
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


# Search-space names for TrainingArguments options, as users say them.
ALIASES = {"batch_size": "per_device_train_batch_size", "epochs": "num_train_epochs"}
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
