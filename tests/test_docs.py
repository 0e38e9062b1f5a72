"""The docs: a README for users (at most 10 KB), no page that reads like a diary, and a flag reference
(docs/cli.md) that is exactly what the option schema generates."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from slmops.cli import build_parser
from slmops.cli.reference import render
from slmops.workflow.reading import load_workflow

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_is_the_front_door():
    readme = (ROOT / "README.md").read_bytes()
    assert len(readme) <= 10 * 1024
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-2] in readme.decode() and ci[-1] in readme.decode()  # the README's two commands are CI's


def test_cli_reference_is_generated_from_the_schema():
    assert (ROOT / "docs" / "cli.md").read_text(encoding="utf-8") == render(), \
        "docs/cli.md is stale: run `python -m slmops.cli.reference`"


@pytest.mark.parametrize("command", ["finetune", "data", "evaluate", "auto-opt", "generate-adapter", "generate"])
def test_every_flag_of_ours_is_in_the_reference(command):
    parser, _ = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    if command == "data":
        sub = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices["check"]
    own = [opt for action in sub._actions if action.help != argparse.SUPPRESS
           and not isinstance(action, argparse._HelpAction) for opt in action.option_strings]
    reference = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    missing = [f for f in own if f"`{f}`" not in reference and f not in ("--log_level", "--save_config_file",
                                                                          "--compare")]
    assert own and not missing, f"docs/cli.md lacks {missing}"


def test_pages_describe_the_product_not_its_history():
    found = {p.name: m.group(0) for p in PAGES for m in [re.search(r"(?i)\bsession\b|this turn|\blanded\b",
                                                                    p.read_text(encoding="utf-8"))] if m}
    assert not found


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if not (page.parent / target).exists():
                broken.append(f"{page.name} -> {target}")
    assert not broken


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_the_example_workflows_read_as_written(example, monkeypatch):
    """The docs tell users to run these as they are; a rule the reader gained since must not break one."""
    if not (ROOT.parent / "shared" / "data" / "sst2").is_dir():
        pytest.skip("the examples read ../shared/data/sst2, which this checkout lacks")
    monkeypatch.chdir(ROOT)
    assert load_workflow(str(example.relative_to(ROOT))).passes
