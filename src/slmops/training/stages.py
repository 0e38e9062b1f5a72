"""Preference stages (`--stage dpo|orpo|kto`): TRL's trainers, one registered per stage, in the same recipe.

The recipe's model (with its adapter already attached, or the full model) goes to TRL unchanged. With an
adapter, TRL's reference is the model under a frozen copy of the adapter ("ref"): the base itself for a new
adapter, the SFT policy for one continued with `--adapter_path`, and no second copy of the base in memory.
Full fine-tuning (`--method full`) makes TRL copy the model for its reference: twice the weights.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from typing import Any

from transformers import Trainer, TrainerCallback

from slmops.data.prepare import PreparedData


@dataclass(frozen=True)
class Stage:
    module: str
    config: str
    trainer: str
    # the evaluation metrics reported before -> after (TRL's names, without eval_)
    metrics: tuple[str, ...]


STAGES = {
    "dpo": Stage("trl", "DPOConfig", "DPOTrainer", ("rewards/accuracies", "rewards/margins")),
    "orpo": Stage("trl.experimental.orpo", "ORPOConfig", "ORPOTrainer", ("rewards/accuracies", "rewards/margins")),
    "kto": Stage("trl", "KTOConfig", "KTOTrainer", ("rewards/margins", "rewards/chosen", "rewards/rejected")),
}


def stage_config(stage: str, beta: float | None, max_seq_len: int) -> tuple[type, dict[str, Any]]:
    """The stage's TrainingArguments class (TRL's config) and the values slmops sets on it."""
    found = STAGES[stage]
    values: dict[str, Any] = {"max_length": max_seq_len}
    if beta is not None:
        values["beta"] = beta
    return _trl(found.module, found.config), values


def preference_trainer(stage: str, model: Any, args: Any, data: PreparedData, tokenizer: Any,
                       callbacks: list[TrainerCallback]) -> Trainer:
    """TRL's trainer for `stage` over the prepared preference rows."""
    found = STAGES[stage]
    trainer_class = _trl(found.module, found.trainer)
    return trainer_class(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                         processing_class=tokenizer, callbacks=callbacks)


def _trl(module: str, name: str) -> type:
    """A TRL class; ORPO lives in trl.experimental, whose import warning a user can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*trl.experimental")
        return getattr(importlib.import_module(module), name)
