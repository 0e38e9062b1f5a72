"""The README's flag reference covers every flag of slmops's own (TrainingArguments are listed by --help)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from slmops.cli import Parser, finetune, generate

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


@pytest.mark.parametrize("module", [finetune, generate])
def test_every_own_flag_is_documented(module):
    sub = Parser(prog="slmops").add_subparsers(parser_class=Parser)
    module.register(sub, full=False)
    parser = next(iter(sub.choices.values()))
    flags = [opt for action in parser._actions if not isinstance(action, argparse._HelpAction)
             for opt in action.option_strings if opt.startswith("--")]
    assert flags
    missing = [f for f in flags if f"`{f}`" not in README and f"{f}`" not in README]
    assert not missing, f"README lacks {missing}"
