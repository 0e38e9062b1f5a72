"""`slmops generate`: stream a model's answer to one prompt."""

from __future__ import annotations

import argparse
import sys

from slmops.cli import add_log_level
from slmops.cli.flags import add_options, given
from slmops.options.generate_options import GenerateOptions


def register(sub: argparse._SubParsersAction, full: bool = True) -> dict:
    p = sub.add_parser("generate", help="generate text from a model (and adapter)",
                       description="Generate a continuation of --prompt, streaming it to stdout.")
    add_options(p, GenerateOptions)
    add_log_level(p)
    return {"generate": handle}


def handle(args: argparse.Namespace) -> int:
    from slmops.api import generate
    from slmops.data.formatting import unescape

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    options = given(args)
    generate(unescape(options.pop("prompt")), on_text=write, **options)  # \n typed in a shell is a newline
    sys.stdout.write("\n")
    return 0
