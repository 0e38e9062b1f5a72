"""`slmops models list|pull`: the built-in catalogue of models obtainable without the hub."""

from __future__ import annotations

import argparse

from slmops.cli import add_log_level


def register(sub: argparse._SubParsersAction, full: bool = True) -> dict:
    p = sub.add_parser("models", help="list or fetch catalogue models", description="The model catalogue.")
    actions = p.add_subparsers(dest="action", required=True, parser_class=type(p))
    add_log_level(actions.add_parser("list", help="list catalogue models and whether they are cached"))
    pull = actions.add_parser("pull", help="fetch and convert a catalogue model into the local cache")
    pull.add_argument("name", help="catalogue alias, e.g. smollm2-135m-instruct")
    add_log_level(pull)
    return {"models": handle}


def handle(args: argparse.Namespace) -> int:
    from slmops.artifacts.folders import cache_root
    from slmops.models import catalog

    if args.action == "list":
        for entry in catalog.CATALOG.values():
            folder = cache_root() / "models" / entry.name
            state = f"cached in {folder}" if (folder / "config.json").exists() else "not pulled yet"
            print(f"{entry.name:28s} {entry.description} [{state}]")
        return 0
    print(catalog.pull(args.name))
    return 0
