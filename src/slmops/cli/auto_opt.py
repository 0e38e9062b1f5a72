"""`slmops auto-opt`: Olive's flags; exports to ONNX Runtime GenAI and checks parity."""

from __future__ import annotations

import argparse
import sys

from slmops.cli import add_log_level, add_save_config
from slmops.cli.flags import add_options, given
from slmops.options.export_options import ExportOptions


def register(sub: argparse._SubParsersAction, full: bool = True) -> dict:
    p = sub.add_parser("auto-opt", help="export a model (and adapter) to an optimised ONNX Runtime GenAI folder",
                       description="Export with onnxruntime-genai's model builder (torch.onnx for architectures it "
                                   "lacks), then check the result against the PyTorch model (parity.json); a "
                                   "failed check exits 1 and leaves OUTPUT.failed instead of OUTPUT.")
    add_options(p, ExportOptions)
    add_save_config(p)
    add_log_level(p)
    return {"auto-opt": handle}


def handle(args: argparse.Namespace) -> int:
    from slmops.api import auto_opt
    from slmops.export.auto_opt import ParityError

    try:
        auto_opt(save_config_file=args.save_config_file, **given(args))
    except ParityError as err:
        print(f"slmops auto-opt: parity check failed: {err}", file=sys.stderr)
        return 1
    return 0
