"""`slmops auto-opt`: Olive's flags; exports to ONNX Runtime GenAI and checks parity."""

from __future__ import annotations

import argparse
import sys

from slmops.cli import add_log_level, add_save_config, str2bool
from slmops.export.builder import PRECISIONS, PROVIDERS


def register(sub: argparse._SubParsersAction, full: bool = True) -> dict:
    p = sub.add_parser("auto-opt", help="export a model (and adapter) to an optimised ONNX Runtime GenAI folder",
                       description="Export with onnxruntime-genai's model builder (torch.onnx for architectures it "
                                   "lacks), then check the result against "
                                   "the PyTorch model (parity.json); a failed check exits 1 and leaves "
                                   "OUTPUT.failed instead of OUTPUT.")
    p.add_argument("-m", "--model_name_or_path", help="model folder, .gguf, catalogue alias, hub id, or a "
                                                      "`slmops finetune` output folder (its adapter is merged)")
    p.add_argument("-a", "--adapter_path", help="LoRA adapter folder (or finetune output folder) merged into the "
                                                "weights before export")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="target device (default cpu)")
    p.add_argument("--provider", choices=list(PROVIDERS),
                   help="execution provider (default: CPUExecutionProvider on cpu, CUDAExecutionProvider on gpu)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="weight precision (default fp32)")
    p.add_argument("--use_ort_genai", type=str2bool, nargs="?", const=True, default=True,
                   help="write an ONNX Runtime GenAI folder (always on: the builder writes one; accepted for "
                        "Olive compatibility)")
    p.add_argument("--exporter", choices=["auto", "builder", "torch"], default="auto",
                   help="auto (default): onnxruntime-genai's model builder, or torch.onnx for architectures it "
                        "does not know; builder or torch: only that one")
    p.add_argument("--parity_prompts", type=int, default=16,
                   help="prompts for the parity check (default 16, from the adapter's training data when known)")
    p.add_argument("--trust_remote_code", type=str2bool, nargs="?", const=True, default=False)
    p.add_argument("-o", "--output_path", required=True, help="output folder")
    p.add_argument("--overwrite", type=str2bool, nargs="?", const=True, default=False,
                   help="replace an existing --output_path")
    add_save_config(p)
    add_log_level(p)
    return {"auto-opt": handle}


def handle(args: argparse.Namespace) -> int:
    from slmops.errors import UsageError
    from slmops.export.auto_opt import ParityError, check_flags
    from slmops.workflow.commands import export_workflow, run_command

    if not args.use_ort_genai:
        raise UsageError("--use_ort_genai false: slmops writes ONNX Runtime GenAI folders only (they hold a plain "
                         "model.onnx too); drop the flag")
    check_flags(args.output_path, args.device, args.provider, args.precision, True, args.parity_prompts,
                args.exporter)
    settings = {"precision": args.precision, "device": args.device, "provider": args.provider,
                "exporter": args.exporter,
                "parity_prompts": args.parity_prompts, "output_path": args.output_path, "overwrite": args.overwrite}
    try:
        run_command(export_workflow(_model(args), args.adapter_path, "ModelBuilder", settings,
                                    args.trust_remote_code), args.save_config_file)
    except ParityError as err:
        print(f"slmops auto-opt: parity check failed: {err}", file=sys.stderr)
        return 1
    return 0


def _model(args: argparse.Namespace) -> str:
    """Without -m, the base model the adapter records (as `auto-opt -a ADAPTER` always allowed)."""
    if args.model_name_or_path:
        return args.model_name_or_path
    from slmops.errors import UsageError
    from slmops.evaluation.backends import base_model_of
    from slmops.generation import adapter_dir

    if not args.adapter_path:
        raise UsageError("pass --model_name_or_path (and optionally --adapter_path)")
    return base_model_of(adapter_dir(args.adapter_path))
