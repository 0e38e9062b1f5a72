"""`slmops generate`: stream a model's answer to one prompt."""

from __future__ import annotations

import argparse
import sys

from slmops.cli import add_log_level, str2bool


def register(sub: argparse._SubParsersAction, full: bool = True) -> dict:
    p = sub.add_parser("generate", help="generate text from a model (and adapter)",
                       description="Generate a continuation of --prompt, streaming it to stdout.")
    p.add_argument("-m", "--model_name_or_path", help="model folder, .gguf, alias, hub id, or ONNX "
                                                      "Runtime GenAI folder (default: the adapter's base model)")
    p.add_argument("--adapter_path", help="adapter folder, or a `slmops finetune` output folder")
    p.add_argument("--adapter", help="for an ONNX multi-adapter folder (`slmops generate-adapter`): the adapter "
                                     "to answer with (default: none, the base model)")
    p.add_argument("--prompt", required=True, help=r"the prompt text (\n and \t typed in the shell become a newline and a tab)")
    p.add_argument("--chat", type=str2bool, nargs="?", const=True, default=False,
                   help="wrap the prompt as a user message with the chat template")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--do_sample", type=str2bool, nargs="?", const=True, default=False,
                   help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--trust_remote_code", type=str2bool, nargs="?", const=True, default=False)
    add_log_level(p)
    return {"generate": handle}


def handle(args: argparse.Namespace) -> int:
    from slmops.data.formatting import unescape
    from slmops.generation import generate

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    generate(unescape(args.prompt), args.model_name_or_path, args.adapter_path, args.chat, args.max_new_tokens,
             args.do_sample, args.temperature, args.top_p, args.seed, args.trust_remote_code, on_text=write,
             adapter=args.adapter)
    sys.stdout.write("\n")
    return 0
