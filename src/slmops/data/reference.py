"""A 2 KB general English text shipped with slmops: the forgetting check's perplexity and the parity
gate's built-in prompts and held-out windows are measured on it."""

from __future__ import annotations

from importlib.resources import files


def reference_text() -> str:
    return files("slmops.data").joinpath("reference.txt").read_text(encoding="utf-8")
