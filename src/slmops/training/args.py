"""Hugging Face TrainingArguments with slmops defaults, and the precision choice for this machine."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from slmops.artifacts.machine import bf16_kernels, native_bf16
from slmops.errors import UsageError, first_line
from slmops.options.finetune_options import FinetuneOptions
from slmops.options.methods import METHODS
from slmops.options.training_args import training_argument_names
from slmops.training.sharding import sharding_args

log = logging.getLogger(__name__)


def autocast_dtype(cfg: FinetuneOptions) -> tuple[torch.dtype, str]:
    """The mixed-precision dtype this run uses, and why (for the manifest): the user's choice, else the
    fastest exact-enough one on this device."""
    dtype, why = _choose_dtype(cfg)
    if dtype == torch.bfloat16 and not on_gpu(cfg) and not native_bf16():
        log.warning("bf16 on a CPU without native BF16 (no avx512_bf16/amx_bf16) is emulated: expect steps "
                    "~100x slower than fp32; drop --bf16/--torch_dtype bfloat16")
    return dtype, why


def _choose_dtype(cfg: FinetuneOptions) -> tuple[torch.dtype, str]:
    ta = cfg.training_args
    for flag, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if ta.get(flag):
            return dtype, f"--{flag}"
    explicit = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if cfg.torch_dtype in explicit:
        return explicit[cfg.torch_dtype], f"--torch_dtype {cfg.torch_dtype}"
    if "bf16" in ta or "fp16" in ta:  # given, and off
        return torch.float32, "--bf16/--fp16 off"
    if on_gpu(cfg):
        return (torch.bfloat16, "GPU with bf16") if torch.cuda.is_bf16_supported() else (torch.float16, "GPU without bf16")
    if native_bf16():
        return torch.bfloat16, f"CPU with native bf16: {bf16_kernels()}"
    return torch.float32, "CPU without native bf16 (no avx512_bf16/amx_bf16): bf16 would be emulated"


def on_gpu(cfg: FinetuneOptions) -> bool:
    return torch.cuda.is_available() and not cfg.training_args.get("use_cpu")


def build_training_args(cfg: FinetuneOptions, checkpoint_dir: Path, amp: torch.dtype,
                        config: type = TrainingArguments, **stage: Any) -> TrainingArguments:
    """Defaults that suit fine-tuning small models, then the user's TrainingArguments on top; `config` is
    a TrainingArguments subclass (a TRL stage's) taking the `stage` values besides."""
    user = dict(cfg.training_args)
    if "evaluation_strategy" in user:  # transformers 5's name is eval_strategy
        user.setdefault("eval_strategy", user.pop("evaluation_strategy"))
    if user.pop("group_by_length", False):  # now a sampling strategy
        user.setdefault("train_sampling_strategy", "group_by_length")
    unknown = sorted(set(user) - training_argument_names())
    if unknown:
        raise UsageError(f"unknown training option(s): {', '.join('--' + u for u in unknown)}; see "
                         f"`slmops finetune --help` for Hugging Face TrainingArguments names")
    args: dict[str, Any] = {
        "learning_rate": METHODS[cfg.method].learning_rate,
        "logging_steps": 10,
        "save_steps": 500,
        "report_to": "none",
        "include_num_input_tokens_seen": "non_padding",
        "eval_on_start": True,  # the untrained model's validation metrics: every run reports before -> after
        # and at a quarter, half, three quarters and the end of training: a curve, not a line between two
        # points. Forward passes only, in batches of 32: five evaluations cost about what two in batches
        # of transformers' 8 did (SmolLM2, 200 SST-2 rows: 2.5 s each against 4.3 s)
        "eval_strategy": "steps",
        "eval_steps": 0.25,
        "per_device_eval_batch_size": 32,
        "remove_unused_columns": False,
        "dataloader_pin_memory": on_gpu(cfg),
    }
    args.update(user)
    args.update(sharding_args(user, on_gpu(cfg), cfg.method))
    if not on_gpu(cfg):
        # Without use_cpu, transformers 5 leaves a torchrun-launched CPU job undistributed: every rank
        # trains alone on all the data.
        args["use_cpu"] = True
        if args.get("torch_compile") and cfg.packing:
            # measured: 12 steps of a 2-layer test model took 84 s compiled against 1.4 s eager
            log.warning("--torch_compile on CPU: packed batches change length every step, so torch.compile "
                        "recompiles instead of training (minutes a step at first); slmops's CPU path is "
                        "fastest eager: drop --torch_compile")
    args["output_dir"] = str(checkpoint_dir)
    args["seed"] = cfg.seed
    if "bf16" not in user and "fp16" not in user:
        args["bf16"] = amp == torch.bfloat16
        args["fp16"] = amp == torch.float16 and on_gpu(cfg)
    if cfg.early_stopping_patience:
        if "eval_steps" not in user:
            args["eval_steps"] = args["save_steps"]
        args.setdefault("metric_for_best_model", "eval_loss")
        args.setdefault("load_best_model_at_end", True)
        args["save_strategy"] = args["eval_strategy"]
    if args.get("gradient_checkpointing"):
        args.setdefault("gradient_checkpointing_kwargs", {"use_reentrant": False})
    try:
        return config(**args, **stage)
    except (ValueError, TypeError) as err:
        raise UsageError(f"invalid training options: {first_line(err)}") from None
