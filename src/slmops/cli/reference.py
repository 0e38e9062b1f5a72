"""docs/cli.md, the flag reference, written from the options models: `python -m slmops.cli.reference`
rewrites it, and a test fails when the file is stale."""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import BaseModel

from slmops.cli.flags import flag_kind, spellings
from slmops.options.benchmark_options import BenchmarkOptions
from slmops.options.evaluate_options import EvaluateOptions
from slmops.options.export_options import ExportOptions, ExtractAdaptersOptions, QuantizeOptions
from slmops.options.fields import GROUPS, meta
from slmops.options.finetune_options import DataOptions, FinetuneOptions
from slmops.options.generate_options import GenerateOptions
from slmops.options.methods import METHODS
from slmops.options.review_options import ReviewOptions
from slmops.options.serve_options import ServeOptions

COMMANDS: tuple[tuple[str, type[BaseModel], str], ...] = (
    ("finetune", FinetuneOptions, "Also every Hugging Face `TrainingArguments` flag (`--learning_rate`, "
                                  "`--max_steps`, ...), passed through; `slmops finetune --help` lists them."),
    ("data check", DataOptions, "The data flags of `finetune`: the data is prepared exactly as `finetune` would."),
    ("evaluate", EvaluateOptions, "Also `--compare RUN...`: several runs side by side."),
    ("auto-opt", ExportOptions, ""),
    ("quantize", QuantizeOptions, "`auto-opt` at int4 or int8; see [export.md](export.md#quantization)."),
    ("generate-adapter", ExtractAdaptersOptions, ""),
    ("generate", GenerateOptions, ""),
    ("serve", ServeOptions, "MODEL may also be given first, without a flag: `slmops serve MODEL`."),
    ("benchmark", BenchmarkOptions, "lm-evaluation-harness tasks; see [benchmark.md](benchmark.md)."),
    ("review", ReviewOptions, "Blind side-by-side human review; see [review.md](review.md)."),
)
HEAD = """# Command-line reference

Generated from the option schema (`src/slmops/options/`) by `python -m slmops.cli.reference`; do not edit
by hand. Each flag is also a keyword of the Python function (`slmops.finetune(lora_r=8, ...)`) and a key of
the matching workflow pass (`passes.NAME.config`, under the Olive name where one is given). Every command
also takes `--log_level` (0 debug with tracebacks ... 4 critical); `finetune`, `auto-opt` and
`generate-adapter` take `--save_config_file FILE` (the workflow they run, for `slmops run --config`).
"""


def render() -> str:
    parts = [HEAD]
    for command, model, note in COMMANDS:
        parts.append(f"## slmops {command}\n")
        if note:
            parts.append(f"{note}\n")
        if model is FinetuneOptions:
            methods = ", ".join(f"`{m.name}` ({m.pass_type}, learning rate {m.learning_rate:g})"
                                for m in METHODS.values())
            parts.append(f"Methods (workflow pass type, default learning rate): {methods}.\n")
        parts.append("| flag | value | default | Olive name | what it does |\n|---|---|---|---|---|")
        hidden = getattr(model, "unused", ())
        for name, info in model.model_fields.items():
            m = meta(info)
            if not m["cli"] or name in hidden:
                continue
            flags = ", ".join(f"`{f}`" for f in spellings(name, m["flags"]))
            default = "required" if info.is_required() else f"`{info.default}`" if info.default not in (None, [], {}) \
                else ""
            parts.append(f"| {flags} | {_value(info)} | {default} | {info.alias or ''} | "
                         f"{GROUPS[m['group']]}: {(info.description or '').replace('|', '/')} |")
        parts.append("")
    return "\n".join(parts)


def _value(info: object) -> str:
    kind = flag_kind(info.annotation)
    if meta(info).get("choices") is not None:
        return " / ".join(meta(info)["choices"])
    if "choices" in kind:
        return " / ".join(map(str, kind["choices"]))
    kind_type = kind.get("type")
    names = {int: "integer", float: "number"}
    if kind_type in names:
        return names[kind_type]
    if kind.get("metavar") == "BOOL":
        return "true / false"
    if kind_type is not None and kind_type.__name__ == "csv":
        return "comma-separated"
    if kind_type is not None and kind_type.__name__ == "json_object":
        return "JSON object"
    return "text"


def main() -> None:
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[3] / "docs" / "cli.md"
    target.write_text(render(), encoding="utf-8")
    print(target)


if __name__ == "__main__":
    main()
