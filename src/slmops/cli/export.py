"""`slmops auto-opt`, `quantize` and `generate-adapter`: Olive's flags; export to ONNX Runtime GenAI, check parity."""

from __future__ import annotations

import argparse
import sys

from slmops.cli import add_log_level, add_save_config
from slmops.cli.flags import add_options, given
from slmops.options.export_options import ExportOptions, ExtractAdaptersOptions, QuantizeOptions

COMMANDS = {
    "auto-opt": (ExportOptions, "auto_opt", "export a model (and adapter) to an optimised ONNX Runtime GenAI folder",
                 "Export with onnxruntime-genai's model builder (torch.onnx for architectures it lacks), then check "
                 "the result against the PyTorch model (parity.json); a failed check exits 1 and leaves "
                 "OUTPUT.failed instead of OUTPUT."),
    "quantize": (QuantizeOptions, "quantize", "int4 or int8 weights (RTN or k-quant), parity-checked, as an ONNX "
                 "Runtime GenAI folder",
                 "Export a model (plus adapter, merged; or kept in float when it was trained quantization-aware) "
                 "with int4 or int8 MatMul weights made by ONNX Runtime's quantizers, then check it against the "
                 "PyTorch model (parity.json). See docs/export.md#quantization."),
    "generate-adapter": (ExtractAdaptersOptions, "generate_adapter",
                         "one ONNX base model plus one .onnx_adapter file per LoRA adapter",
                         "Export the base model with its LoRA weights as graph inputs, write each adapter as "
                         "adapters/NAME.onnx_adapter, and check every adapter's output against PyTorch."),
}


def register(sub: argparse._SubParsersAction, full: bool = True) -> dict:
    for command, (options, _, summary, description) in COMMANDS.items():
        p = sub.add_parser(command, help=summary, description=description)
        add_options(p, options)
        add_save_config(p)
        add_log_level(p)
    return {command: handle for command in COMMANDS}


def handle(args: argparse.Namespace) -> int:
    import slmops.api
    from slmops.errors import ParityError

    export = getattr(slmops.api, COMMANDS[args.command][1])
    try:
        export(save_config_file=args.save_config_file, **given(args))
    except ParityError as err:
        print(f"slmops {args.command}: parity check failed: {err}", file=sys.stderr)
        return 1
    return 0
