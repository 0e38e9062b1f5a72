"""Output folders are built beside their final place and swapped in only when complete.

A crash, Ctrl-C or failed check therefore never leaves a half-written folder (or file) under the
name a user, or the next command, reads. Also the slmops cache folder and content digests.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from slmops.errors import UsageError

PARTIAL = ".partial"


def cache_root() -> Path:
    """Converted models, memos and digests: $SLMOPS_HOME, else ~/.cache/slmops."""
    return Path(os.environ.get("SLMOPS_HOME", Path.home() / ".cache" / "slmops"))


def partial_dir(out: Path) -> Path:
    """Where `out` is built (and where an interrupted run keeps its checkpoints)."""
    return out.with_name(out.name + PARTIAL)


def refuse_existing(out: Path, overwrite: bool, flag: str = "--output_path") -> None:
    """Never clobber a result the user did not ask us to replace."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UsageError(f"output path {out} already exists; choose another {flag} or add --overwrite")


def work_dir(out: Path) -> Path:
    """A fresh `OUT.partial` to build in; leftovers of an earlier failed attempt are dropped."""
    work = partial_dir(out)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return work


def publish(work: Path, out: Path) -> None:
    """Swap the finished folder into place; an old one (with --overwrite) goes only after."""
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    work.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def write_text(path: Path, text: str) -> Path:
    """Write a file whole or not at all: a temporary file in the same folder, then an atomic rename
    (two search workers may write the same one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: Path) -> Any:
    """The file's JSON, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def file_digest(path: Path) -> str:
    """sha256 over a file, or a folder's files (names and bytes). Remembered per (path, size, mtime)
    in the cache's digests.json, so an unchanged multi-GB model is read once."""
    if not path.exists():
        raise UsageError(f"not found: {path}; check the path in the workflow")
    files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
    memo_file = cache_root() / "digests.json"
    memo = read_json(memo_file) or {}
    total, changed = hashlib.sha256(), False
    for f in files:
        st = f.stat()
        ident = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if ident not in memo:
            h = hashlib.sha256()
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
            memo[ident], changed = h.hexdigest(), True
        total.update(f"{f.relative_to(path) if f != path else f.name}:{memo[ident]}\n".encode())
    if changed:
        try:
            write_json(memo_file, memo)
        except OSError:
            pass  # a read-only home only costs re-hashing next time
    return total.hexdigest()


def folder_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20, 1)
