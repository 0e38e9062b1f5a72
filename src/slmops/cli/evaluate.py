"""`slmops evaluate`: metrics for a model (plus adapter) on one data split, or several runs side by side."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from slmops.cli import add_log_level
from slmops.cli.finetune import _csv, add_data_args
from slmops.errors import UsageError
from slmops.evaluation.metrics import KNOWN

NOT_USED = ("eval_fraction", "max_eval_samples", "max_seq_len", "train_on_prompt", "add_eos", "seed")
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
    model, data = add_data_args(p)
    for action in p._actions:  # finetune's flags, as evaluate reads them
        if action.dest == "model_name_or_path":
            action.required = False  # --compare and --adapter_path can name the model instead
        elif action.dest == "eval_split":
            action.help = "split to evaluate, with an optional slice (default: --train_split, all rows of a file)"
        elif action.dest == "max_samples":
            action.help = "evaluate only the first N rows"
        elif action.dest in NOT_USED:
            action.help = argparse.SUPPRESS  # accepted, so finetune's data flags can be pasted unchanged
    model.add_argument("--adapter_path", "--adapter", help="adapter folder, or a `slmops finetune` output folder; "
                                                           "without -m, the base model recorded in the adapter. For "
                                                           "an ONNX multi-adapter folder: the adapter's name")
    e = p.add_argument_group("evaluation")
    e.add_argument("--metrics", type=_csv, help=f"comma-separated, from {','.join(KNOWN)} (default: accuracy,f1 "
                                                f"for labels; exact_match,bleu,rouge for generation)")
    e.add_argument("--predict", default="likelihood",
                   help="for labels: 'likelihood' (default) picks the label the model scores highest after the "
                        "prompt; 'generate' decodes greedily and matches the answer to a label")
    e.add_argument("--batch_size", type=int, default=16, help="sequences per forward pass (default 16)")
    e.add_argument("--max_new_tokens", type=int,
                   help="generation budget (default: the longest label plus 2 tokens, or 128)")
    e.add_argument("-o", "--output_path", help="write the results as JSON (results.json) here")
    e.add_argument("--compare", nargs="+", metavar="RUN",
                   help="show several runs side by side in one table; each RUN is a results.json from "
                        "--output_path, or a model evaluated now with this command's data and metric flags: "
                        "MODEL, MODEL@ADAPTER, or @ADAPTER (its recorded base model); replaces -m/--adapter_path")
    add_log_level(e)
    return {"evaluate": handle}


def handle(args: argparse.Namespace) -> int:
    from slmops.evaluation.run import evaluate, save_results

    options = {k: v for k, v in vars(args).items() if k not in ("command", "log_level", "output_path", "compare")}
    options["progress"] = args.log_level < 2
    if args.compare:
        if args.model_name_or_path or args.adapter_path:
            raise UsageError("--compare names every run itself (MODEL, MODEL@ADAPTER, @ADAPTER or a results.json); "
                             "drop -m/--adapter_path")
        runs = []
        for item in args.compare:
            runs += _read_runs(item) or [evaluate(**{**options, **_spec(item)})]
        print(compare_table(runs))
        results: dict[str, Any] = {"runs": runs}
    else:
        results = evaluate(**options)
        print(table(results))
    if args.output_path:
        print(f"wrote {save_results(results, args.output_path)}")
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
             "", *_grid(["metric", "value"], [[k, _fmt(k, v)] for k, v in result["metrics"].items()])]
    if result.get("per_class"):
        keys = ("precision", "recall", "f1", "support")
        lines += ["", *_grid(["label", *keys], [[label, *(_fmt(k, c[k]) for k in keys)]
                                                 for label, c in result["per_class"].items()])]
        conf = result["confusion"]
        lines += ["", "confusion (rows: true label, columns: predicted):",
                  *_grid(["", *conf["predicted"]],
                         [[t, *map(str, row)] for t, row in zip(conf["true"], conf["counts"])])]
    return "\n".join(lines)


def compare_table(runs: list[dict[str, Any]]) -> str:
    """Metrics as rows, runs as columns; a warning when the runs did not see the same rows."""
    names = list(dict.fromkeys(k for r in runs for k in r["metrics"]))
    rows = [[k, *(_fmt(k, r["metrics"].get(k)) for r in runs)] for k in names]
    rows += [["rows", *(str(r["data"]["rows"]) for r in runs)],
             ["data", *(r["data"]["fingerprint"][:12] for r in runs)]]
    lines = _grid(["metric", *(f"[{i}]" for i in range(1, len(runs) + 1))], rows)
    lines += [""] + [f"[{i}] {_name(r)} ({r['backend']}, {r['task']})" for i, r in enumerate(runs, start=1)]
    if len({r["data"]["fingerprint"] for r in runs}) > 1:
        lines.append("warning: the runs were evaluated on different rows (data fingerprints differ); "
                     "their metrics do not compare directly")
    return "\n".join(lines)


def _read_runs(item: str) -> list[dict[str, Any]]:
    """The runs in a results.json (one run, or a --compare file's list); [] when `item` names a model."""
    path = Path(item).expanduser()
    if path.suffix != ".json":
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


def _spec(item: str) -> dict[str, str | None]:
    """MODEL, MODEL@ADAPTER or @ADAPTER (a path containing @ that exists is a model)."""
    if "@" not in item or Path(item).expanduser().exists():
        return {"model_name_or_path": item, "adapter_path": None}
    model, _, adapter = item.rpartition("@")
    return {"model_name_or_path": model or None, "adapter_path": adapter}


def _name(result: dict[str, Any]) -> str:
    return result["model"] + (f" + adapter {result['adapter']}" if result.get("adapter") else "")


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if key in FRACTIONS else f"{value:.2f}"
    return str(value)


def _grid(header: list[str], rows: list[list[str]]) -> list[str]:
    """Plain columns: the first left-aligned, the numbers right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in [header, *rows]]
