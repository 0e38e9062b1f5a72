"""`slmops evaluate`: metrics for a model (plus adapter) on one data split, or several runs side by side."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from slmops.cli import add_log_level, columns
from slmops.cli.flags import add_options, given
from slmops.errors import UsageError
from slmops.options.evaluate_options import EvaluateOptions

FRACTIONS = ("accuracy", "f1", "exact_match", "rouge1", "rouge2", "rougeL", "precision", "recall")
EXAMPLES = """examples:
  slmops evaluate -m smollm2-135m-instruct --adapter_path runs/sst2-lora -d dev.jsonl \\
      --text_template "<|im_start|>user\\n{phrase}<|im_end|>\\n<|im_start|>assistant\\n{tone}<|im_end|>" -o after.json
  slmops evaluate --compare before.json after.json
  slmops evaluate --compare smollm2-135m-instruct smollm2-135m-instruct@runs/sst2-lora -d dev.jsonl \\
      --text_template "..." --metrics accuracy,f1,latency"""


def register(sub: argparse._SubParsersAction, full: bool = True) -> dict:
    p = sub.add_parser(
        "evaluate", help="accuracy, F1, exact match, perplexity, BLEU, ROUGE, latency and throughput of a model",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Evaluate a model, or a model plus adapter, on a data split rendered with --text_template.\n"
                    "When the response (the last placeholder) takes at most 20 values that repeat, it is a label:\n"
                    "accuracy, macro-F1, per-class precision/recall and a confusion matrix; otherwise the\n"
                    "generated answers are compared with the responses (exact match, BLEU, ROUGE).\n"
                    "Perplexity covers whole texts and the response tokens (what finetune's loss covers).")
    add_options(p, EvaluateOptions, hidden=EvaluateOptions.unused)
    e = p.add_argument_group("comparison")
    e.add_argument("--compare", nargs="+", metavar="RUN",
                   help="show several runs side by side in one table; each RUN is a results.json from "
                        "--output_path, or a model evaluated now with this command's data and metric flags: "
                        "MODEL, MODEL@ADAPTER, or @ADAPTER (its recorded base model); replaces -m/--adapter_path")
    add_log_level(e)
    return {"evaluate": handle}


def handle(args: argparse.Namespace) -> int:
    from slmops.api import evaluate
    from slmops.models.adapters import split_spec

    options = given(args, "compare")
    progress = args.log_level < 2
    if args.compare:
        if options.get("model_name_or_path") or options.get("adapter_path"):
            raise UsageError("--compare names every run itself (MODEL, MODEL@ADAPTER, @ADAPTER or a results.json); "
                             "drop -m/--adapter_path")
        output = options.pop("output_path", None)
        runs = []
        for item in args.compare:
            model, adapter = split_spec(item)
            runs += _read_runs(item) or [evaluate(model, adapter, progress=progress, **options)]
        print(compare_table(runs))
        results: dict[str, Any] = {"runs": runs}
        if output:
            from slmops.artifacts.folders import write_json
            print(f"wrote {write_json(Path(output).expanduser(), results)}")
        return 0
    results = evaluate(progress=progress, **options)
    print(table(results))
    if options.get("output_path"):
        print(f"wrote {Path(options['output_path']).expanduser()}")
    return 0


def table(result: dict[str, Any]) -> str:
    """One run: where it came from, its metrics, and for labels the per-class scores and confusion."""
    data = result["data"]
    how = {"classification": f"classification over labels {', '.join(result['labels'] or [])}, predicted by "
                              f"{result.get('predict')}",
           "generation": f"generation (greedy, at most {result.get('max_new_tokens')} new tokens)",
           "text": "perplexity of whole texts"}[result["task"]]
    lines = [f"model: {_name(result)} ({result['backend']})",
             f"data: {', '.join(data['data_files'] or [data['data_name']])} [{data['split']}], {data['rows']} rows, "
             f"fingerprint {data['fingerprint'][:12]}",
             f"task: {how}",
             "", *columns(["metric", "value"], [[k, _fmt(k, v)] for k, v in result["metrics"].items()])]
    if result.get("per_class"):
        keys = ("precision", "recall", "f1", "support")
        lines += ["", *columns(["label", *keys], [[label, *(_fmt(k, c[k]) for k in keys)]
                                                 for label, c in result["per_class"].items()])]
        conf = result["confusion"]
        lines += ["", "confusion (rows: true label, columns: predicted):",
                  *columns(["", *conf["predicted"]],
                         [[t, *map(str, row)] for t, row in zip(conf["true"], conf["counts"])])]
    return "\n".join(lines)


def compare_table(runs: list[dict[str, Any]]) -> str:
    """Metrics as rows, runs as columns; a warning when the runs did not see the same rows."""
    names = list(dict.fromkeys(k for r in runs for k in r["metrics"]))
    rows = [[k, *(_fmt(k, r["metrics"].get(k)) for r in runs)] for k in names]
    rows += [["rows", *(str(r["data"]["rows"]) for r in runs)],
             ["data", *(r["data"]["fingerprint"][:12] for r in runs)]]
    lines = columns(["metric", *(f"[{i}]" for i in range(1, len(runs) + 1))], rows)
    lines += [""] + [f"[{i}] {_name(r)} ({r['backend']}, {r['task']})" for i, r in enumerate(runs, start=1)]
    if len({r["data"]["fingerprint"] for r in runs}) > 1:
        lines.append("warning: the runs were evaluated on different rows (data fingerprints differ); "
                     "their metrics do not compare directly")
    return "\n".join(lines)


def _read_runs(item: str) -> list[dict[str, Any]]:
    """The runs in a results.json, or an evaluation folder's (one run, or a --compare file's list); [] when
    `item` names a model."""
    path = Path(item).expanduser()
    if path.is_dir() and (path / "results.json").is_file():
        path = path / "results.json"
    elif path.suffix != ".json":
        return []
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--compare: results file not found: {item}") from None
    except (OSError, ValueError) as err:
        raise UsageError(f"--compare: cannot read {item} ({err}); pass a results.json from --output_path") from None
    runs = content.get("runs", [content]) if isinstance(content, dict) else []
    if not runs or not all(isinstance(r, dict) and "metrics" in r and "data" in r for r in runs):
        raise UsageError(f"--compare: {item} is not a results.json written by slmops evaluate --output_path")
    return runs


def _name(result: dict[str, Any]) -> str:
    return result["model"] + (f" + adapter {result['adapter']}" if result.get("adapter") else "")


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if key in FRACTIONS else f"{value:.2f}"
    return str(value)
