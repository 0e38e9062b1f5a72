"""The shape of a workflow file (Olive's): each section a strict pydantic model.

Only the file's layout lives here: what a pass or a data config holds is the options model of its
pass type (`slmops.options`), checked when the workflow is loaded. Unknown keys are errors; Olive's
keys that have no effect here are accepted, so a config written for Olive loads unchanged.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from slmops.options.fields import Positive, PositiveInt


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


class DataSpec(Strict):
    name: str
    type: Literal["HuggingfaceContainer"] = "HuggingfaceContainer"
    load_dataset_config: LoadDataset = LoadDataset()
    pre_process_data_config: dict[str, Any] = {}   # data options of `finetune`, checked by the pass that reads it
    dataloader_config: dict[str, Any] = {}         # Olive's evaluation loader; ignored
    post_process_data_config: dict[str, Any] = {}  # ignored

    @property
    def files(self) -> list[str] | None:
        files = self.load_dataset_config.data_files
        return [files] if isinstance(files, str) else files


# ---- search ------------------------------------------------------------------------------------

class SearchStrategy(Strict):
    type: Literal["random", "tpe", "grid"] = Field("tpe", alias="sampler")
    num_trials: PositiveInt = Field(10, alias="max_samples")
    seed: int = 0
    max_time: Positive | None = None  # seconds for the whole study
    metric: str = "eval_loss"
    direction: Literal["minimize", "maximize"] | None = None
    storage: str | None = None        # SQLAlchemy URL; default: sqlite file in the pass folder
    study_name: str | None = None
    heartbeat_interval: PositiveInt = 30  # seconds between a running trial's heartbeats
    grace_period: PositiveInt = 120   # a trial this long without one is its dead worker's, and runs again
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
