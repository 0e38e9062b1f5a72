"""`slmops data check`: the data doctor, with the same data flags as `finetune`."""

from __future__ import annotations

import argparse

from slmops.cli import add_log_level
from slmops.cli.flags import add_options, given
from slmops.options.finetune_options import DataOptions


def register(sub: argparse._SubParsersAction, full: bool = True) -> dict:
    p = sub.add_parser("data", help="inspect training data (data check)", description="Data tools.")
    actions = p.add_subparsers(dest="action", required=True, parser_class=type(p))
    check = actions.add_parser("check", help="row counts, lengths, truncation, supervised share, label balance, "
                                             "duplicates, train/validation overlap and a rendered example",
                               description="Prepare the data exactly as `slmops finetune` would and report "
                                           "what it finds; fatal problems exit with status 2.")
    add_options(check, DataOptions)
    add_log_level(check)
    return {"data": handle}


def handle(args: argparse.Namespace) -> int:
    from slmops.data.sources import local_files
    from slmops.models.catalog import resolve

    options = DataOptions.build(**given(args))
    resolve(options.model_name_or_path)  # wrong paths are refused before the tokenizer and datasets load
    local_files(options.data_name, options.data_files)
    from slmops.data.doctor import check

    print(check(options))
    return 0
