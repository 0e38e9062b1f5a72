"""Hugging Face TrainingArguments' fields: every one is a `finetune` option that passes through unchanged.

Their single list is transformers' own dataclass, remembered per transformers version (each field's
name, flag kind and first sentence of help): importing the trainer takes seconds, which a workflow
re-run that reuses every pass, `slmops finetune --help` or a mistyped flag should not pay.
"""

from __future__ import annotations

import types
import typing
from importlib.metadata import version
from typing import Any

from slmops.artifacts.folders import cache_root, read_json, write_json

# TrainingArguments fields that slmops sets itself, or that make no sense on a command line
OWNED = frozenset({"output_dir", "seed", "resume_from_checkpoint", "local_rank", "do_train", "do_eval",
                   "do_predict", "hub_token", "log_level", "log_level_replica", "logging_dir"})
# Names Olive users type that transformers 5 renamed or dropped -> what they mean now
RENAMED = {"evaluation_strategy": "eval_strategy", "group_by_length": "train_sampling_strategy"}


def training_argument_fields() -> list[dict[str, Any]]:
    """Each field TrainingArguments takes: `name`, `kind` (bool, int, float, str, or json for a dict field,
    which takes JSON or a file path), `help`, and transformers' own argparse `nargs`/`const` where set."""
    memo = cache_root() / f"training-arguments-{version('transformers')}.json"
    fields = read_json(memo)
    if not (isinstance(fields, list) and all(isinstance(f, dict) and {"name", "kind", "help"} <= f.keys()
                                             for f in fields)):
        fields = _read_fields()
        try:
            write_json(memo, fields)
        except OSError:
            pass  # a read-only home only costs the import next time
    return fields


def training_argument_names() -> frozenset[str]:
    """Every name TrainingArguments takes, plus the old names in RENAMED."""
    return frozenset(f["name"] for f in training_argument_fields()) | frozenset(RENAMED)


def _read_fields() -> list[dict[str, Any]]:
    import dataclasses

    from transformers import TrainingArguments

    fields = []
    for f in dataclasses.fields(TrainingArguments):
        if f.init:
            kind = "json" if "dict" in str(f.type) else _kind(f.type)
            fields.append({"name": f.name, "kind": kind, "help": (f.metadata.get("help") or "").split(". ")[0],
                           **{k: f.metadata[k] for k in ("nargs", "const") if k in f.metadata}})
    return fields


def _kind(annotation: Any) -> str:
    """A field's flag kind: str wherever a string is accepted."""
    if isinstance(annotation, str):
        return annotation if annotation in ("bool", "int", "float") else "str"
    union = isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
    args = typing.get_args(annotation) if union else (annotation,)
    return next((c.__name__ for c in (str, bool, int, float) if c in args), "str")
