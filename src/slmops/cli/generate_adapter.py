"""`slmops generate-adapter`: one ONNX base model, many LoRA adapters switched at run time."""

from __future__ import annotations

import argparse
import sys

from slmops.cli import add_log_level, add_save_config
from slmops.cli.flags import add_options, given
from slmops.options.export_options import ExtractAdaptersOptions


def register(sub: argparse._SubParsersAction, full: bool = True) -> dict:
    p = sub.add_parser("generate-adapter", help="one ONNX base model plus one .onnx_adapter file per LoRA adapter",
                       description="Export the base model with its LoRA weights as graph inputs, write each "
                                   "adapter as adapters/NAME.onnx_adapter, and check every adapter's output "
                                   "against PyTorch.")
    add_options(p, ExtractAdaptersOptions)
    add_save_config(p)
    add_log_level(p)
    return {"generate-adapter": handle}


def handle(args: argparse.Namespace) -> int:
    from slmops.api import generate_adapter
    from slmops.export.auto_opt import ParityError

    try:
        generate_adapter(save_config_file=args.save_config_file, **given(args))
    except ParityError as err:
        print(f"slmops generate-adapter: parity check failed: {err}", file=sys.stderr)
        return 1
    return 0
