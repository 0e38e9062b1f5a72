"""`slmops finetune`: Olive's flags, plus every Hugging Face TrainingArguments flag."""

from __future__ import annotations

import argparse
import sys

from slmops.cli import add_log_level, add_save_config
from slmops.cli.flags import add_options, add_training_arguments, given
from slmops.options.finetune_options import FinetuneOptions


def register(sub: argparse._SubParsersAction, full: bool = True) -> dict:
    """`full=False` registers the command without the TrainingArguments flags (for fast top-level help)."""
    p = sub.add_parser("finetune", help="fine-tune a model on a dataset (LoRA, QLoRA, DoRA, ... or full)",
                       description="Fine-tune a causal language model. Accepts Olive's `finetune` flags and "
                                   "any Hugging Face TrainingArguments flag.")
    add_options(p, FinetuneOptions)
    add_save_config(p)
    add_log_level(p)
    if full:
        add_training_arguments(p, set(FinetuneOptions.model_fields))
    return {"finetune": handle}


def handle(args: argparse.Namespace) -> int:
    from slmops.api import finetune
    from slmops.errors import Interrupted

    try:
        out = finetune(save_config_file=args.save_config_file, **given(args))
    except Interrupted as err:
        print(f"slmops finetune: {err}", file=sys.stderr)
        return 130
    print(f"wrote {out}")
    return 0
