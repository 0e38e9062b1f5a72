"""Output folders are built beside their final place and swapped in only when complete.

A crash, Ctrl-C or failed check therefore never leaves a half-written folder under the name
a user (or the next command) reads.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from slmops.errors import UsageError


def refuse_existing(out: Path, overwrite: bool, flag: str = "--output_path") -> None:
    """Never clobber a result the user did not ask us to replace."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UsageError(f"output path {out} already exists; choose another {flag} or add --overwrite")


def work_dir(out: Path) -> Path:
    """A fresh `OUT.partial` to build in; leftovers of an earlier failed attempt are dropped."""
    work = out.with_name(out.name + ".partial")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return work


def write_json(path: Path, data: Any) -> None:
    """Write a JSON file whole or not at all (two search workers may write the same one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def publish(work: Path, out: Path) -> None:
    """Swap the finished folder into place; an old one (with --overwrite) goes only after."""
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    work.rename(out)
    shutil.rmtree(old, ignore_errors=True)
