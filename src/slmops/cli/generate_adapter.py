"""`slmops generate-adapter`: one ONNX base model, many LoRA adapters switched at run time."""

from __future__ import annotations

import argparse

from slmops.cli import add_log_level, add_save_config, str2bool
from slmops.export.builder import PRECISIONS, PROVIDERS


def register(sub: argparse._SubParsersAction, full: bool = True) -> dict:
    p = sub.add_parser("generate-adapter", help="one ONNX base model plus one .onnx_adapter file per LoRA adapter",
                       description="Export the base model with its LoRA weights as graph inputs, write each "
                                   "adapter as adapters/NAME.onnx_adapter, and check every adapter's output "
                                   "against PyTorch.")
    p.add_argument("--base_model_path", "-m", "--model_name_or_path", dest="base_model_path", required=True,
                   help="the base model the adapters were trained on (folder, .gguf, alias or hub id)")
    p.add_argument("--adapter_paths", required=True, type=lambda s: [x for x in s.split(",") if x],
                   help="comma-separated adapter folders or `slmops finetune` output folders")
    p.add_argument("--adapter_names", type=lambda s: [x for x in s.split(",") if x],
                   help="comma-separated names, one per adapter (default: the run's --task_name, else the "
                        "folder name)")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--provider", choices=list(PROVIDERS))
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="base weight precision (adapter weights stay fp32: they are inputs, not quantizable)")
    p.add_argument("--parity_prompts", type=int, default=8, help="prompts per adapter for the parity check")
    p.add_argument("--trust_remote_code", type=str2bool, nargs="?", const=True, default=False)
    p.add_argument("-o", "--output_path", required=True)
    p.add_argument("--overwrite", type=str2bool, nargs="?", const=True, default=False)
    add_save_config(p)
    add_log_level(p)
    return {"generate-adapter": handle}


def handle(args: argparse.Namespace) -> int:
    import sys

    from slmops.export.auto_opt import ParityError
    from slmops.workflow.commands import export_workflow, run_command

    settings = {"adapter_paths": args.adapter_paths, "adapter_names": args.adapter_names, "device": args.device,
                "provider": args.provider, "precision": args.precision, "parity_prompts": args.parity_prompts,
                "output_path": args.output_path, "overwrite": args.overwrite}
    try:
        run_command(export_workflow(args.base_model_path, None, "ExtractAdapters", settings,
                                    args.trust_remote_code), args.save_config_file)
    except ParityError as err:
        print(f"slmops generate-adapter: parity check failed: {err}", file=sys.stderr)
        return 1
    return 0
