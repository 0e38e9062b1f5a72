"""How an option is declared, and how a model's problems are told to the user.

`option()` is a pydantic `Field` plus what the other views of the option need: extra CLI spellings
(`-m`), the help group (which is also where the option sits in a workflow file), and Olive's name for
it (the field's alias: a workflow file may say `r` for `lora_r`). `Options.build` validates once and
reports every problem in one line under the flags' names; `problems()` in a subclass adds the checks
that involve several fields.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Callable, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from slmops.errors import UsageError

GROUPS = {"model": "model", "data": "data", "method": "method", "export": "export", "evaluation": "evaluation",
          "generation": "generation", "server": "server", "limits": "limits", "run": "run"}


def option(default: Any = ..., help: str = "", *, olive: str | None = None, flags: tuple[str, ...] = (),
           group: str = "run", cli: bool = True, metavar: str | None = None, choices: Any = None) -> Any:
    """A field of an options model. `cli=False`: accepted from files and the API, not a flag. `choices`: a
    registry whose names are the values, read when the parser is built (a text field checks it itself)."""
    if group not in GROUPS:
        raise ValueError(f"unknown option group {group!r}")
    return Field(default, description=help, alias=olive, json_schema_extra={
        "group": group, "flags": list(flags), "cli": cli, "metavar": metavar, "choices": choices})


def meta(info: Any) -> dict[str, Any]:
    """An option's extra metadata (group, flags, cli, metavar, choices) from its pydantic FieldInfo."""
    return dict(info.json_schema_extra or {"group": "run", "flags": [], "cli": True, "metavar": None,
                                           "choices": None})


def _positive_int(v: int) -> int:
    if v <= 0:
        raise ValueError(f"must be a positive integer, got {v}")
    return v


def _positive(v: float) -> float:
    if v <= 0:
        raise ValueError(f"must be positive, got {v}")
    return v


def _dropout(v: float) -> float:
    if not 0 <= v < 1:
        raise ValueError(f"must lie in [0, 1), got {v}")
    return v


def _share(v: float) -> float:
    if not 0 < v < 1:
        raise ValueError(f"must lie between 0 and 1, got {v}")
    return v


PositiveInt = Annotated[int, AfterValidator(_positive_int)]
Positive = Annotated[float, AfterValidator(_positive)]
Dropout = Annotated[float, AfterValidator(_dropout)]
Share = Annotated[float, AfterValidator(_share)]


class Options(BaseModel):
    """Base of every command's options: unknown names are errors, Olive's aliases are accepted."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _cross_checks(self) -> Self:
        found = self.problems()
        if found:
            raise ValueError("; ".join(found))
        return self

    def problems(self) -> list[str]:
        """Bad combinations of fields, each naming its --flags; every one at once."""
        return []

    @classmethod
    def build(cls, **options: Any) -> Self:
        """Validate once; a bad value is one line naming the flag and the fix."""
        try:
            return cls.model_validate(options)
        except ValidationError as err:
            raise UsageError("; ".join(describe(err))) from None


def describe(err: ValidationError, where: Callable[[str], str] | None = None,
             unknown: str = "unknown option") -> list[str]:
    """pydantic's errors as sentences. Without `where`, under CLI flags (`--lora_r must be ...`); with it,
    under the place each option was given (`passes.lora.config.r: must be ...`), `where(name)` giving it."""
    out = []
    for e in err.errors():
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = unknown
        elif e["type"] == "missing":
            msg = "required, not given"
        elif e["type"] == "literal_error":
            msg = f"got {e['input']!r}; {msg[0].lower()}{msg[1:]}"
        loc = [str(p) for p in e["loc"]]
        if not loc:  # a check across fields: its message names the --flags
            out.append(msg if where is None else re.sub(r"--(\w+)", lambda m: where(m[1]), msg))
            continue
        name = ".".join(loc)
        if where is not None:
            rest = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"][1:])
            out.append(f"{where(loc[0])}{rest}: {msg}")
        else:
            out.append(f"--{name} {msg}" if msg.startswith("must ") else f"--{name}: {msg}")
    return out


def fields_in(model: type[BaseModel], *groups: str) -> list[str]:
    """The model's option names in these help groups, in declaration order."""
    return [name for name, info in model.model_fields.items() if meta(info)["group"] in groups]


def olive_names(model: type[BaseModel]) -> dict[str, str]:
    """Olive's name -> ours, for the options that have one."""
    return {info.alias: name for name, info in model.model_fields.items() if info.alias}
