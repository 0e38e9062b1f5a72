"""The fine-tuning options as one validated object.

The CLI and the Python API both build a `FinetuneConfig`; nothing downstream reads argv.
Our own options are fields; every Hugging Face `TrainingArguments` option travels in
`training_args` unchanged, as Olive passes them.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from slmops.errors import UsageError

EVAL_METRICS = ("accuracy",)  # computed in slmops.training.metrics
Method = Literal["lora", "dora", "qlora", "loha", "lokr", "ia3", "full"]
METHODS: tuple[str, ...] = Method.__args__  # type: ignore[attr-defined]


class DataConfig(BaseModel):
    """The model (for its tokenizer) and how to read, render and split the data: what `finetune`
    trains on and `data check` inspects."""

    model_config = ConfigDict(extra="forbid")

    # model
    model_name_or_path: str
    trust_remote_code: bool = False
    # data
    data_name: str | None = None
    data_files: list[str] | None = None
    train_subset: str | None = None
    train_split: str = "train"
    eval_subset: str | None = None
    eval_split: str | None = None
    eval_fraction: float = 0.1
    max_eval_samples: int = 1000
    text_template: str | None = None
    text_field: str | None = None
    use_chat_template: bool = False
    max_seq_len: int = 1024
    max_samples: int | None = None
    train_on_prompt: bool = False
    add_eos: bool = True
    seed: int = 42

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        problems = self._problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _problems(self) -> list[str]:
        """Every bad combination at once (subclasses add theirs)."""
        problems = []
        if self.text_template and self.text_field:
            problems.append("--text_template and --text_field are exclusive: give one of them")
        if self.use_chat_template and self.text_template:
            problems.append("--use_chat_template renders message lists; drop --text_template "
                            "(name the messages column with --text_field)")
        if not (self.text_template or self.text_field or self.use_chat_template):
            problems.append("say how to turn a row into text: --text_template, --text_field or "
                            "--use_chat_template")
        for name in ("max_seq_len", "max_eval_samples"):
            if getattr(self, name) <= 0:
                problems.append(f"--{name} must be a positive integer, got {getattr(self, name)}")
        if self.max_samples is not None and self.max_samples <= 0:
            problems.append(f"--max_samples must be a positive integer, got {self.max_samples}")
        if not 0 < self.eval_fraction < 1:
            problems.append(f"--eval_fraction must lie between 0 and 1, got {self.eval_fraction}")
        return problems

    @classmethod
    def build(cls, **options: Any) -> Self:
        """Validate options, turning pydantic's report into one actionable line."""
        try:
            return cls(**options)
        except ValidationError as err:
            raise UsageError(_describe(err)) from None


# Built-in losses by name (slmops.training.losses.BUILTINS holds them); anything else is FILE.py:ClassName.
LOSSES = ("cross_entropy", "label_smoothing", "contrastive")
TOKEN_LOSSES = ("cross_entropy", "label_smoothing")
USER_LOSS = re.compile(r".+\.py:[A-Za-z_]\w*")


class FinetuneConfig(DataConfig):
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    packing: bool = True
    share_prefix: bool | None = None  # None: wherever it is exact (nothing in the model drops out)
    text_pair_field: str | None = None  # sentence-pair rows: --text_field and this column, plus a 0/1 label
    pair_label_field: str = "label"
    # method
    method: Method = "lora"
    lora_r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    target_modules: list[str] | None = None
    modules_to_save: list[str] | None = None
    loss: str = "cross_entropy"
    loss_args: dict[str, Any] = {}
    # run
    output_path: str
    task_name: str | None = None
    overwrite: bool = False
    merge: bool = False
    quantization_aware: Literal["int4"] | None = None
    early_stopping_patience: int | None = None
    eval_metrics: list[str] | None = None
    resume_from_checkpoint: str | None = None
    logging_dir: str | None = None
    training_args: dict[str, Any] = {}

    @model_validator(mode="before")
    @classmethod
    def _loss_block(cls, options: Any) -> Any:
        """A config file's `loss: {type: ..., args: {...}}` is the same as `loss` plus `loss_args`."""
        if isinstance(options, dict) and isinstance(options.get("loss"), dict):
            block = dict(options["loss"])
            unknown = sorted(set(block) - {"type", "args"})
            if unknown or "type" not in block:
                raise ValueError(f"loss: expected {{type: NAME or FILE.py:ClassName, args: {{...}}}}, got keys "
                                 f"{', '.join(map(str, block)) or 'none'}")
            options = {**options, "loss": block["type"], "loss_args": block.get("args") or {}}
        return options

    @field_validator("loss_args", mode="before")
    @classmethod
    def _json_args(cls, value: Any) -> Any:
        """The CLI passes --loss_args as JSON text."""
        if not isinstance(value, str):
            return value
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"not valid JSON ({err}); give an object such as '{{\"margin\": 1.0}}'") from None
        if not isinstance(value, dict):
            raise ValueError(f"expected a JSON object such as '{{\"margin\": 1.0}}', got {json.dumps(value)}")
        return value

    def _problems(self) -> list[str]:
        problems = super()._problems()
        if self.loss not in LOSSES and not USER_LOSS.fullmatch(self.loss):
            problems.append(f"--loss: got {self.loss!r}; give a built-in ({', '.join(LOSSES)}) or "
                            f"FILE.py:ClassName naming your torch.nn.Module")
        if self.text_pair_field:
            if not self.text_field or self.use_chat_template:
                problems.append("--text_pair_field pairs two text columns: name the first with --text_field "
                                "(no --text_template or --use_chat_template)")
            if self.loss in TOKEN_LOSSES:
                problems.append(f"--loss {self.loss} predicts tokens; sentence pairs (--text_pair_field) need "
                                f"--loss contrastive or your own FILE.py:ClassName")
            if self.eval_metrics:
                problems.append("--eval_metrics score generated responses; sentence pairs (--text_pair_field) "
                                "have none: drop --eval_metrics")
        elif self.loss == "contrastive":
            problems.append("--loss contrastive compares sentence pairs: name the second text column with "
                            "--text_pair_field (and its 0/1 label column with --pair_label_field)")
        if self.method == "full" and self.merge:
            problems.append("--merge has nothing to merge with --method full (it writes model/ already)")
        if self.quantization_aware and self.method in ("full", "qlora"):
            problems.append(f"--quantization_aware trains an adapter against a frozen int4-rounded base; "
                            f"--method {self.method} has no such base (use lora, dora, loha, lokr or ia3)")
        if self.quantization_aware and self.merge:
            problems.append("--quantization_aware with --merge: merging into float weights undoes what the "
                            "adapter learned; export it with auto-opt --precision int4 instead (kept unmerged)")
        if self.lora_r <= 0:
            problems.append(f"--lora_r must be a positive integer, got {self.lora_r}")
        if self.lora_alpha <= 0:
            problems.append(f"--lora_alpha must be positive, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"--lora_dropout must lie in [0, 1), got {self.lora_dropout}")
        unknown = sorted(set(self.eval_metrics or ()) - set(EVAL_METRICS))
        if unknown:
            problems.append(f"--eval_metrics: unknown metric(s) {', '.join(unknown)}; "
                            f"known: {', '.join(EVAL_METRICS)}")
        return problems


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown option"
        elif e["type"] == "literal_error":
            msg = f"got {e['input']!r}; {msg[0].lower()}{msg[1:]}"
        parts.append(f"--{loc}: {msg}" if loc else msg)
    return "; ".join(parts)
