"""`slmops benchmark`: lm-evaluation-harness tasks on a model, a model plus adapter, or an exported folder,
several side by side."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from slmops.cli import add_log_level, columns
from slmops.cli.flags import add_options, given
from slmops.options.benchmark_options import BenchmarkOptions

EXAMPLES = """examples:
  slmops benchmark -m smollm2-135m-instruct --tasks examples/lm_eval/sst2.yaml --limit 100
  slmops benchmark --tasks examples/lm_eval/sst2.yaml -o runs/bench \\
      --compare smollm2-135m-instruct,@runs/sst2-lora,runs/sst2-onnx@tone"""


def register(sub: argparse._SubParsersAction, full: bool = True) -> dict:
    p = sub.add_parser("benchmark", help="established benchmarks through EleutherAI's lm-evaluation-harness",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
                       description="Score models on lm-evaluation-harness tasks (its names, or task YAML files "
                                   "of your own over local data) through slmops's model class, so a PyTorch "
                                   "model, the same with an adapter and its ONNX export compare in one table "
                                   "with the harness's standard errors. See docs/benchmark.md.")
    add_options(p, BenchmarkOptions)
    add_log_level(p)
    return {"benchmark": handle}


def handle(args: argparse.Namespace) -> int:
    from slmops.api import benchmark

    options = given(args)
    summary = benchmark(**options)
    print(table(summary))
    if options.get("output_path"):
        print(f"wrote {Path(options['output_path']).expanduser()}")
    return 0


def table(summary: dict[str, Any]) -> str:
    """Task and metric as rows, models as columns: value ± standard error."""
    models = summary["models"]
    rows = []
    for task in summary["tasks"]:
        metrics = dict.fromkeys(k for scores in summary["scores"] for k in scores.get(task, {}))
        for metric in metrics:
            rows.append([f"{task} {metric}", *(_cell(scores.get(task, {}).get(metric)) for scores in summary["scores"])])
    lines = columns(["task metric", *(f"[{i}]" for i in range(1, len(models) + 1))], rows)
    lines += [""] + [f"[{i}] {m['model']}" + (f" + adapter {m['adapter']}" if m.get("adapter") else "") +
                     f" ({m['backend']}, {m['seconds']:.0f} s)" for i, m in enumerate(models, start=1)]
    return "\n".join(lines)


def _cell(value: list | None) -> str:
    if not value:
        return "-"
    score, stderr = value
    return f"{score:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")
