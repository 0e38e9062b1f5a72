"""`report.html`: one page that says whether a fine-tune went well, readable without Python or a network.

Everything comes from the run folder (`manifest.json`, `metrics.jsonl`), so a report can be drawn again
for any finished run. Curves are inline SVG drawn by matplotlib and the page has no scripts and no
external resources: it opens offline, attaches to an issue, and still works when copied elsewhere.
"""

from __future__ import annotations

import html
import json
import math
from io import StringIO
from pathlib import Path
from typing import Any, Iterable

from slmops.artifacts.folders import write_text
from slmops.errors import UsageError, first_line

OVERFIT_EVALS = 3  # validation loss rising over the last 3 evaluations while training loss falls: overfitting
DIVERGE_RATIO = 1.5  # a last training loss above 1.5x the first: divergence
TRUNCATION_SHARE = 0.05  # more than 5% of a split's rows cut at --max_seq_len: the model misses their ends
IMBALANCE_RATIO = 10  # the label imbalance at which `finetune` itself warns
FORGETTING_RATIO = 1.5  # general-text perplexity rising more than this: forgetting (finetune warns too)

CHANCE_ACCURACY = 0.55  # a preference run's last validation reward accuracy at or below this: stuck at chance
MARGIN_COLLAPSE = 0.5  # the last validation reward margin under half its best: the margins are collapsing

Series = list[tuple[float, float]]
# title, x axis, y axis, the curves drawn together
PLOTS = (("Loss", "step", "loss", ("train loss", "validation loss")),
         ("Learning rate", "step", "learning rate", ("learning rate",)),
         ("Throughput", "seconds since the start of training", "tokens/s", ("tokens/s",)),
         ("Memory", "seconds since the start of training", "MB", ("resident memory", "GPU memory")))
# drawn when the run has them: the task metric, and a preference stage's own curves (TRL's logs)
EXTRA_PLOTS = (("Task metrics", "step", "share of validation responses", ("validation accuracy", "validation F1")),
               ("Reward margin", "step", "chosen - rejected reward", ("reward margin", "validation reward margin")),
               ("Reward accuracy", "step", "pairs ranked right", ("reward accuracy", "validation reward accuracy")),
               ("Log-probabilities", "step", "log p of the answer", ("chosen log-prob", "rejected log-prob")))
STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;margin-top:1.6em}td,th{padding:2px 10px;text-align:left;
vertical-align:top}tr:nth-child(even){background:#f4f4f4}.plots{display:grid;grid-template-columns:1fr 1fr;gap:1em}
figure{margin:0}svg{width:100%;height:auto}.warn li{background:#fde2e2;margin:.3em 0;padding:.3em .6em}
.ok{color:#26734d}code{word-break:break-all}"""


def write_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write the page atomically (a half-written report is never left behind) and return its path."""
    run_dir = Path(run_dir).expanduser()
    manifest, events = read_run(run_dir)
    bench = run_dir / "benchmark.json"
    benchmark = json.loads(bench.read_text(encoding="utf-8")) if bench.is_file() else None
    target = Path(output).expanduser() if output else run_dir / "report.html"
    target = target / "report.html" if target.is_dir() else target
    if not target.parent.is_dir():
        raise UsageError(f"--output {target}: the folder {target.parent} does not exist; create it or choose "
                         f"another path")
    return write_text(target, render(manifest, events, benchmark))


def read_run(run_dir: Path) -> tuple[dict, list[dict]]:
    """The manifest and the log events; a file that cannot be used is a UsageError naming it and the fix."""
    path = run_dir / "manifest.json"
    if not path.is_file():
        raise UsageError(f"{run_dir} is not a slmops run folder (no manifest.json); pass the --output_path "
                         f"of a finished `slmops finetune` run")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: not valid JSON ({first_line(err)}); rerun the fine-tune to rewrite it") from None
    if not isinstance(manifest, dict):
        raise UsageError(f"{path}: expected a JSON object; rerun the fine-tune to rewrite it")
    metrics = run_dir / "metrics.jsonl"
    events = []
    for number, line in enumerate(metrics.read_text(encoding="utf-8").splitlines() if metrics.is_file() else [], 1):
        try:
            event = json.loads(line) if line.strip() else {}
        except ValueError:
            event = None
        if not isinstance(event, dict):
            raise UsageError(f"{metrics}:{number}: malformed JSON line; fix or delete that line")
        events.append(event)
    return manifest, events


def curves(events: Iterable[dict]) -> dict[str, Series]:
    """Every series the page draws, by name, in x order (the tests compare them to metrics.jsonl)."""
    events = list(events)

    def points(x: str, *ys: str) -> Series:
        found = [(e[x], e[y]) for e in events for y in ys if _number(e.get(x)) and _number(e.get(y))]
        return sorted(found, key=lambda p: p[0])  # stable: points logged at one step keep their order

    return {"train loss": points("step", "loss"), "validation loss": points("step", "eval_loss"),
            "validation accuracy": points("step", "eval_accuracy"), "validation F1": points("step", "eval_f1"),
            "learning rate": points("step", "learning_rate"), "tokens/s": points("time_s", "tokens_per_second"),
            "resident memory": points("time_s", "rss_mb", "eval_rss_mb"),
            "GPU memory": points("time_s", "gpu_memory_mb", "eval_gpu_memory_mb"),
            "reward margin": points("step", "rewards/margins"),
            "validation reward margin": points("step", "eval_rewards/margins"),
            "reward accuracy": points("step", "rewards/accuracies"),
            "validation reward accuracy": points("step", "eval_rewards/accuracies"),
            "chosen log-prob": points("step", "logps/chosen"), "rejected log-prob": points("step", "logps/rejected")}


def diagnose(manifest: dict, series: dict[str, Series]) -> list[str]:
    """Problems a reader should see first: read off the curves, plus those the run already recorded."""
    results, data = manifest.get("results") or {}, manifest.get("data") or {}
    return [*_curve_warnings(series), *_preference_warnings(series), *_data_warnings(data), *_run_warnings(results)]


def _preference_warnings(series: dict[str, Series]) -> list[str]:
    """A preference run that learns nothing: reward accuracy at chance, or margins that grew and fell back."""
    found = []
    accuracy = [v for step, v in series.get("validation reward accuracy", []) if step > 0]
    if accuracy and accuracy[-1] <= CHANCE_ACCURACY:
        found.append(f"reward accuracy at chance: the last validation reward accuracy is {_fmt(accuracy[-1])}; "
                     f"raise --learning_rate or train longer, and check with `slmops data check --stage ...` that "
                     f"chosen and rejected answers differ in what matters")
    margins = [v for _, v in series.get("validation reward margin", [])]
    if len(margins) > 2 and max(margins) > 0 and margins[-1] < MARGIN_COLLAPSE * max(margins):
        found.append(f"reward margins collapsing: the validation margin fell from {_fmt(max(margins))} to "
                     f"{_fmt(margins[-1])}; lower --learning_rate, or keep an earlier checkpoint")
    return found


def _curve_warnings(series: dict[str, Series]) -> list[str]:
    found = []
    train, evals = series["train loss"], sorted(dict(series["validation loss"]).items())  # one value per step
    bad = next((step for step, loss in train + evals if not math.isfinite(loss)), None)
    if bad is not None:
        found.append(f"divergence: the loss became NaN or infinite at step {_fmt(bad)}; lower --learning_rate, "
                     f"or train in bf16/fp32 instead of fp16")
    elif len(train) > 1 and train[-1][1] > DIVERGE_RATIO * train[0][1]:
        found.append(f"divergence: the last training loss ({_fmt(train[-1][1])}) is {train[-1][1] / train[0][1]:.1f}x "
                     f"the first ({_fmt(train[0][1])}); lower --learning_rate or add warmup (--warmup_steps)")
    last = evals[-OVERFIT_EVALS:]
    window = [p for p in train if last and last[0][0] <= p[0] <= last[-1][0]]
    rising = len(last) == OVERFIT_EVALS and all(a[1] < b[1] for a, b in zip(last, last[1:]))
    if rising and len(window) > 1 and _slope(window) < 0:
        found.append(f"overfitting: validation loss rose over the last {OVERFIT_EVALS} evaluations "
                     f"({' -> '.join(_fmt(v) for _, v in last)}) while the training loss fell; train fewer epochs, "
                     f"or keep the best checkpoint (--load_best_model_at_end true, --early_stopping_patience)")
    return found


def _data_warnings(data: dict) -> list[str]:
    found = []
    for split in ("train", "eval"):
        stats = data.get(split) or {}
        rows = (stats.get("rows") or 0) + (stats.get("dropped") or 0)
        if rows and (stats.get("truncated") or 0) / rows > TRUNCATION_SHARE:
            found.append(f"heavy truncation: {stats['truncated']} of {rows} {split} rows were cut at --max_seq_len "
                         f"{_fmt(data.get('max_seq_len'))} (over {TRUNCATION_SHARE:.0%}); raise --max_seq_len")
    checks = data.get("checks") or {}
    if checks.get("duplicate_train_rows"):
        found.append(f"data: {checks['duplicate_train_rows']} training rows repeat an earlier row exactly")
    if checks.get("eval_rows_in_train"):
        found.append(f"data: {checks['eval_rows_in_train']} validation rows also appear in the training rows; "
                     f"the validation loss looks better than it is")
    if (checks.get("label_imbalance") or 0) >= IMBALANCE_RATIO:
        found.append(f"data: labels are imbalanced {_fmt(checks['label_imbalance'])}:1")
    return found


def _run_warnings(results: dict) -> list[str]:
    found = []
    forgetting, pre = results.get("forgetting") or {}, results.get("preflight") or {}
    if (forgetting.get("ratio") or 0) > FORGETTING_RATIO:
        found.append(f"forgetting: perplexity on general English rose {_fmt(forgetting['ratio'])}x "
                     f"({_fmt(forgetting.get('reference_perplexity_before'))} -> "
                     f"{_fmt(forgetting.get('reference_perplexity_after'))}); lower --learning_rate or "
                     f"--num_train_epochs, or use a smaller --lora_r")
    if (pre.get("est_peak_memory_mb") or 0) > (pre.get("memory_capacity_mb") or math.inf):
        found.append(f"pre-flight: the estimated peak memory ({pre['est_peak_memory_mb']} MB) exceeded the "
                     f"memory available ({pre['memory_capacity_mb']} MB)")
    return found


def render(manifest: dict, events: list[dict], benchmark: dict | None = None) -> str:
    """The whole page; every string that comes from the run is escaped. `benchmark`: what `slmops
    benchmark` wrote into the run folder."""
    series = curves(events)
    options, results = manifest.get("options") or {}, manifest.get("results") or {}
    name = options.get("task_name") or options.get("output_path") or "run"
    warnings = diagnose(manifest, series)
    warn = (f"<ul class=warn>{''.join(f'<li>{_e(w)}</li>' for w in warnings)}</ul>" if warnings
            else "<p class=ok>No problems found in the curves, the data checks or the manifest.</p>")
    resolved = {k: v for k, v in (manifest.get("resolved") or {}).items() if k != "training_args"}
    environment = {"created": manifest.get("created"), "command line": " ".join(map(str, manifest.get("argv") or [])),
                   **(manifest.get("versions") or {}), **(manifest.get("hardware") or {})}
    return "\n".join([
        f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>slmops report: {_e(name)}</title>",
        f"<style>{STYLE}</style></head><body><h1>slmops report: {_e(name)}</h1>",
        f"<p>{_e(manifest.get('command', 'finetune'))} of <code>{_e(options.get('model_name_or_path'))}</code> "
        f"with {_e(options.get('method'))}{_e(_stage(options))} on <code>{_e(options.get('data_name'))}</code>: "
        f"{_e(_fmt(results.get('global_step')))} steps, {_e(_fmt(results.get('wall_time_s')))} s.</p>",
        f"<h2>Warnings</h2>{warn}", "<h2>Curves</h2><div class=plots>",
        *(_plot(title, x, y, {n: series[n] for n in names}) for title, x, y, names in PLOTS + tuple(
            p for p in EXTRA_PLOTS if any(series[n] for n in p[3]))), "</div>",
        "<h2>Validation metrics: before &rarr; after training</h2>", _before_after(results, resolved.get("eval_metrics") or options.get("eval_metrics") or []),
        *(_benchmark(benchmark) if benchmark else ()),
        "<h2>Results</h2>", _table(_flat({k: v for k, v in results.items() if k != "eval_before"})),
        "<h2>Data</h2>", _data(manifest.get("data") or {}),
        "<h2>Configuration</h2>", _table(_flat(options)), "<h3>Resolved</h3>", _table(_flat(resolved)),
        "<details><summary>Training arguments</summary>",
        _table(_flat((manifest.get("resolved") or {}).get("training_args") or {})), "</details>",
        "<h2>Environment</h2>", _table(_flat(environment)), "</body></html>\n"])


def _benchmark(summary: dict) -> list[str]:
    """A table per lm-eval task: its metrics as rows, the models scored as columns, value ± standard error."""
    models = [m.get("model", "") + (f" + {m['adapter']}" if m.get("adapter") else "") + f" ({m.get('backend')})"
              for m in summary.get("models", [])]
    parts = ["<h2>Benchmarks (lm-evaluation-harness)</h2>"]
    for task in summary.get("tasks", []):
        per_model = [s.get(task, {}) for s in summary.get("scores", [])]
        metrics = list(dict.fromkeys(k for scores in per_model for k in scores))
        rows = [(metric, *(_with_error(scores.get(metric)) for scores in per_model)) for metric in metrics]
        parts += [f"<h3>{_e(task)}</h3>", _table(rows, ("metric", *models))]
    return parts


def _with_error(cell: list | None) -> str:
    if not cell:
        return "-"
    value, stderr = cell
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if isinstance(stderr, (int, float)) else "")


def _stage(options: dict) -> str:
    stage = options.get("stage") or "sft"
    return "" if stage == "sft" else f" ({stage.upper()}, beta {_fmt(options.get('beta') or 0.1)})"


def _plot(title: str, xlabel: str, ylabel: str, lines: dict[str, Series]) -> str:
    """An inline SVG figure, or a sentence when there is too little to draw."""
    drawn = {name: pts for name, pts in lines.items() if pts}
    if sum(map(len, drawn.values())) < 2:
        return f"<figure><figcaption><b>{_e(title)}</b></figcaption><p>Not enough logged points to draw " \
               f"{_e(' or '.join(lines))} ({sum(map(len, drawn.values()))} logged).</p></figure>"
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: the caller's backend and global state are left alone

    # every logged point kept; fixed ids (hashes of content) so one run always gives the same page
    with matplotlib.rc_context({"path.simplify": False, "svg.fonttype": "path", "svg.hashsalt": "slmops"}):
        fig = Figure(figsize=(6, 3.4))
        ax = fig.subplots()
        for name, pts in drawn.items():
            ax.plot(*zip(*pts), marker="o", markersize=3, label=name, gid=_slug(name))
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))  # short tick labels fit the fixed margin
        ax.grid(alpha=0.3)
        if len(drawn) > 1:
            ax.legend()
        fig.subplots_adjust(left=0.14, right=0.97, bottom=0.15, top=0.9)  # fixed: tight_layout doubles the time
        buf = StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
    svg = buf.getvalue()
    return f"<figure>{svg[svg.index('<svg'):]}</figure>"


def _before_after(results: dict, metrics: list[str]) -> str:
    before = results.get("eval_before") or {}
    keys = dict.fromkeys([*before, "eval_loss", *(f"eval_{m}" for m in metrics)])
    rows = [(k.removeprefix("eval_"), before.get(k), results.get(k)) for k in keys
            if before.get(k) is not None or results.get(k) is not None]
    if not rows:
        return "<p>This run recorded no validation metrics.</p>"
    change = [(name, b, a, a - b if _number(a) and _number(b) else None) for name, b, a in rows]
    return _table(change, ("metric", "before", "after", "change"))


def _data(data: dict) -> str:
    splits = []
    for split in (k for k in ("train", "eval") if isinstance(data.get(k), dict)):
        s = data[split]
        rows = (s.get("rows") or 0) + (s.get("dropped") or 0)  # truncation is counted before dropping
        splits.append((split, s.get("rows"), s.get("tokens"), f"{_fmt(s.get('truncated'))} "
                       f"({_share(s.get('truncated'), rows)})", s.get("dropped"),
                       _share(s.get("supervised_tokens"), s.get("tokens"))))
    if not splits:
        return "<p>The manifest has no data statistics.</p>"
    head = ("split", "rows", "tokens", f"truncated at {_fmt(data.get('max_seq_len'))}", "dropped",
            "tokens under the loss")
    checks = {k: v for k, v in data.items() if k not in ("train", "eval")}
    return _table(splits, head) + "<h3>Checks</h3>" + _table(_flat(checks))


def _table(rows: Iterable[tuple], head: tuple[str, ...] = ()) -> str:
    rows = list(rows)
    if not rows:
        return "<p>Not recorded.</p>"
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_e(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table>{f'<tr>{th}</tr>' if th else ''}{body}</table>"


def _flat(tree: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested settings as (dotted.key, value) rows; lists are joined so each setting is one row."""
    rows: list[tuple[str, Any]] = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            rows += _flat(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", ", ".join(map(str, value)) if isinstance(value, list) else value))
    return rows


def _share(part: Any, total: Any) -> str:
    return f"{100 * part / total:.1f}%" if _number(part) and _number(total) and total else "-"


def _slope(points: Series) -> float:
    mx, my = (sum(c) / len(points) for c in zip(*points))
    spread = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / spread if spread else 0.0


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower())


def _e(value: Any) -> str:
    return html.escape(str(value))
