"""Command-line flags derived from an options model: one flag per field, typed from its annotation,
documented from its help text and default; defaults stay in the model (an unset flag is left out)."""

from __future__ import annotations

import argparse
import json
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel

from slmops.options.fields import GROUPS, meta
from slmops.options.training_args import OWNED, training_argument_fields


def str2bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    low = value.lower()
    if low in ("1", "true", "yes", "y", "on"):
        return True
    if low in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def json_object(value: str) -> dict | str:
    """A JSON object as a dict; anything else stays text, for the options model to reject in one line."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return value
    return parsed if isinstance(parsed, dict) else value


def add_options(parser: argparse.ArgumentParser, model: type[BaseModel], hidden: tuple[str, ...] = ()) -> None:
    """A flag for every option of `model` shown on the command line, in its help group."""
    groups: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        m = meta(info)
        if not m["cli"]:
            continue
        group = groups.get(m["group"]) or groups.setdefault(m["group"], parser.add_argument_group(GROUPS[m["group"]]))
        kwargs = flag_kind(info.annotation)
        if m.get("choices") is not None:
            kwargs.update(choices=list(m["choices"]), metavar="{" + ",".join(m["choices"]) + "}")
        kwargs["help"] = argparse.SUPPRESS if name in hidden else help_text(info)
        if m["metavar"]:
            kwargs["metavar"] = m["metavar"]
        group.add_argument(*spellings(name, m["flags"]), dest=name, default=argparse.SUPPRESS,
                           required=info.is_required(), **kwargs)


def spellings(name: str, flags: list[str]) -> list[str]:
    """An option's flags: the short ones (-m), then --name, then other spellings (--overwrite_output_dir)."""
    short = [f for f in flags if not f.startswith("--")]
    return [*short, f"--{name}", *(f for f in flags if f.startswith("--"))]


SCALARS = {"bool": bool, "int": int, "float": float, "str": str}  # training_argument_fields' kinds
SWITCHES = ("command", "action", "log_level", "save_config_file")  # the command's own, not options


def given(args: argparse.Namespace, *switches: str) -> dict[str, Any]:
    """The options the user gave on the command line (the rest take the model's defaults)."""
    return {k: v for k, v in vars(args).items() if k not in SWITCHES + switches}


def help_text(info: Any) -> str:
    text = (info.description or "").replace("%", "%%")
    default = info.default
    if info.is_required() or default is None or default == [] or default == {}:
        return text
    shown = str(default).lower() if isinstance(default, bool) else default
    return f"{text} (default {shown})"


def flag_kind(annotation: Any) -> dict[str, Any]:
    """argparse settings for a field's type: bools take an optional true/false, lists are comma-separated,
    objects are JSON, Literals are choices."""
    kind = _plain(annotation)
    if typing.get_origin(kind) is Literal:
        choices = list(typing.get_args(kind))
        return {"choices": choices, "metavar": "{" + ",".join(map(str, choices)) + "}"}
    if kind is bool:
        return {"type": str2bool, "nargs": "?", "const": True, "metavar": "BOOL"}
    if kind in (int, float):
        return {"type": kind}
    if typing.get_origin(kind) is list:
        return {"type": csv}
    if typing.get_origin(kind) is dict:
        return {"type": json_object}
    return {}


def _plain(annotation: Any) -> Any:
    """The type inside Optional[...] and Annotated[...]."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _plain(inner[0]) if len(inner) == 1 else annotation
    return annotation


def add_training_arguments(parser: argparse.ArgumentParser, taken: set[str]) -> None:
    """Every Hugging Face TrainingArguments field as a flag of its own name (transformers' schema)."""
    group = parser.add_argument_group("Hugging Face TrainingArguments (passed through; defaults are "
                                      "transformers' unless noted: learning_rate 2e-4 for adapters, 2e-5 full; "
                                      "logging_steps 10)")
    for f in training_argument_fields():
        if f["name"] not in OWNED and f["name"] not in taken:
            # a dict field (fsdp_config, deepspeed) takes JSON or a file path; bare --fsdp means true
            kwargs = {"type": json_object} if f["kind"] == "json" else flag_kind(SCALARS[f["kind"]])
            kwargs.update({k: f[k] for k in ("nargs", "const") if k in f})
            group.add_argument(f"--{f['name']}", dest=f["name"], default=argparse.SUPPRESS,
                               help=f["help"].replace("%", "%%"), **kwargs)
    group.add_argument("--evaluation_strategy", default=argparse.SUPPRESS, help="old name of --eval_strategy")
    group.add_argument("--group_by_length", type=str2bool, nargs="?", const=True, default=argparse.SUPPRESS,
                       help="old name of --train_sampling_strategy group_by_length")
