"""Hyperparameter search over a fine-tuning pass, on optuna.

Each trial is that pass with sampled settings, trained into `PASS/trials/trial-NNN/`. The study
lives in optuna storage (by default `PASS/study.db`, SQLite; any SQLAlchemy URL, e.g. PostgreSQL,
lets workers on several machines share it), so `slmops search` started twice runs trials in
parallel, and a study that was interrupted picks up where it stopped. Trials that evaluate worse
than the median of earlier ones at the same step are pruned (optuna's MedianPruner).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from slmops.artifacts.folders import read_json, write_json
from slmops.errors import UsageError
from slmops.options.fields import olive_names
from slmops.options.finetune_options import FinetuneOptions
from slmops.workflow.passes import ModelRef, Step, Workflow, finetune, trained_model
from slmops.workflow.reading import ALIASES
from slmops.workflow.schema import Dimension
from slmops.workflow.study import open_storage, patiently, slots, work

log = logging.getLogger(__name__)

RESULTS = "search_results"


class Pruning(TrainerCallback):
    """Reports each validation metric to the trial; stops training when optuna says prune."""

    def __init__(self, trial: Any, metric: str, storage: Any):
        self.trial, self.metric, self.storage, self.pruned = trial, metric, storage, False

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get(self.metric)
        if value is None or state.global_step == 0:  # the untrained model's evaluation says nothing
            return

        def report() -> bool:
            self.trial.report(value, state.global_step)
            return self.trial.should_prune()
        if patiently(self.storage, report, f"trial {self.trial.number}'s step {state.global_step}"):
            self.pruned = True
            control.should_training_stop = True


def search(step: Step, wf: Workflow) -> ModelRef:
    import optuna

    strategy, space = wf.search, wf.space
    step.out.mkdir(parents=True, exist_ok=True)
    storage = _storage(step, wf)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failing trial's error reaches the user as ours
    study = optuna.create_study(
        study_name=study_name(step, wf), storage=storage, load_if_exists=True,
        direction=strategy.goal, sampler=_sampler(strategy.type, space, strategy.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2) if strategy.pruning else optuna.pruners.NopPruner())
    metric = _metric(wf)
    columns = list(space)
    print(_row(["trial", "state", metric, *columns, "seconds"]), flush=True)

    def objective(trial: Any) -> float:
        started = time.perf_counter()
        params = {name: _suggest(trial, name, dim) for name, dim in space.items()}
        folder = _folder(step.out / "trials", trial)
        trial.set_user_attr("folder", str(folder))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        pruning = Pruning(trial, metric, storage)
        options = _with(step.options, params)
        finetune(Step(step.name, step.type, options, step.model, folder, True, callbacks=(pruning,)))
        trial.set_user_attr("seconds", round(time.perf_counter() - started, 1))
        if pruning.pruned:
            raise optuna.TrialPruned()
        manifest = folder / "manifest.json"
        results = (read_json(manifest) or {}).get("results", {})
        if results.get(metric) is None:
            raise UsageError(f"search_strategy.metric: the trials report no {metric}; use eval_loss, or list the "
                             f"metric in the pass's eval_metrics (e.g. accuracy)")
        trial.set_user_attr("metrics", {k: v for k, v in results.items() if isinstance(v, (int, float))})
        trial.set_user_attr("fingerprint", hashlib.sha256(manifest.read_bytes()).hexdigest()[:16])
        return float(results[metric])

    def show(trial: Any) -> None:
        value = "-" if trial.value is None else f"{trial.value:.4f}"
        print(_row([trial.number, trial.state.name.lower(), value, *(trial.params.get(c, "") for c in columns),
                    trial.user_attrs.get("seconds", "")]), flush=True)

    deadline = None if strategy.max_time is None else time.monotonic() + strategy.max_time
    work(study, storage, _planned(strategy, space), objective, show, deadline, strategy.heartbeat_interval)
    return _finish(study, step, metric, columns)


def _storage(step: Step, wf: Workflow) -> Any:
    """The study's database: search_strategy.storage, else a SQLite file in the pass folder."""
    strategy = wf.search
    return open_storage(strategy.storage or f"sqlite:///{(step.out / 'study.db').resolve()}",
                        strategy.heartbeat_interval, strategy.grace_period)


def study_name(step: Step, wf: Workflow) -> str:
    return wf.search.study_name or f"{step.name}-{step.key[:12]}"


def _metric(wf: Workflow) -> str:
    metric = wf.search.metric
    return metric if metric.startswith("eval_") else f"eval_{metric}"


def _folder(trials: Path, trial: Any) -> Path:
    """A trial queued again after its worker died keeps that worker's folder, and so resumes from its
    checkpoint, when the folder is this machine's (a shared disk, or the same machine)."""
    earlier = trial.user_attrs.get("folder")
    if earlier and Path(earlier).parent == trials:
        return Path(earlier)
    return trials / f"trial-{trial.number:03d}"


def _finish(study: Any, step: Step, metric: str, columns: list[str]) -> ModelRef:
    import optuna

    trials = [t for t in slots(study.get_trials(deepcopy=False)) if t.state.is_finished()]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise UsageError("no search trial completed; see the errors above, or raise num_trials / max_time")
    best = study.best_trial
    rows = [_record(t, metric) for t in trials]
    write_json(step.out / f"{RESULTS}.json", {
        "metric": metric, "direction": study.direction.name.lower(), "best_trial": best.number,
        "best_value": best.value, "best_params": best.params, "best_folder": best.user_attrs["folder"],
        "best_worker": best.user_attrs.get("worker"), "trials": rows})
    tmp = step.out / f".{RESULTS}.csv.tmp"
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["trial", "state", metric, *columns, "seconds", "worker", "folder"],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(step.out / f"{RESULTS}.csv")
    folder = Path(best.user_attrs["folder"])
    if not folder.is_dir():
        log.warning("the best trial, %d, was trained by %s: its adapter is in %s on that machine. Copy that folder "
                    "to the same path here (or give the workers a shared output_dir) before later passes use it",
                    best.number, best.user_attrs.get("worker"), folder)
    return trained_model(step.model.path, folder)


def _record(trial: Any, metric: str) -> dict[str, Any]:
    attrs = trial.user_attrs
    return {"trial": trial.number, "state": trial.state.name.lower(), metric: trial.value, **trial.params,
            "seconds": attrs.get("seconds"), "worker": attrs.get("worker"), "folder": attrs.get("folder"),
            "fingerprint": attrs.get("fingerprint"), "retry_of": trial.system_attrs.get("failed_trial")}


def summary(folder: Path) -> str:
    """The finished study as a table, best first, from search_results.json."""
    saved = read_json(folder / f"{RESULTS}.json")
    if saved is None:
        return f"no {RESULTS}.json in {folder}"
    table = _ranked(saved["trials"], saved["metric"], list(saved["best_params"]), saved["direction"])
    best = ", ".join(f"{k}={_fmt(v)}" for k, v in saved["best_params"].items())
    return (f"{table}\nbest: trial {saved['best_trial']} ({saved['metric']} {saved['best_value']:.4f}): {best}; "
            f"adapter in {saved['best_folder']}; all trials in {folder}/{RESULTS}.csv")


def status(step: Step, wf: Workflow) -> str:
    """The study as its database holds it now, from any machine: every trial, and the best so far."""
    import optuna

    strategy = wf.search
    if strategy.storage is None and not (step.out / "study.db").is_file():
        return f"no study yet: {step.out / 'study.db'} does not exist (start `slmops search`, or pass --storage)"
    storage = _storage(step, wf)
    name = study_name(step, wf)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return f"no study named {name} in the database yet (start `slmops search`)"
    metric, trials = _metric(wf), study.get_trials(deepcopy=False)
    counts = Counter(t.state.name.lower() for t in slots(trials))
    retried = sum(1 for t in trials if t.system_attrs.get("failed_trial") is not None)
    states = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    lines = [f"study {name}: {_planned(strategy, wf.space)} planned; {states}; {retried} run again (worker lost "
             f"or interrupted)",
             _ranked([_record(t, metric) for t in trials], metric, list(wf.space), study.direction.name.lower(),
                     extra=["worker"])]
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if done:
        best = study.best_trial
        lines.append(f"best so far: trial {best.number} ({metric} {best.value:.4f}) by {best.user_attrs.get('worker')}"
                     f", adapter in {best.user_attrs.get('folder')} (manifest {best.user_attrs.get('fingerprint')})")
    return "\n".join(lines)


def _ranked(rows: list[dict], metric: str, params: list[str], direction: str, extra: tuple | list = ()) -> str:
    ranked = sorted((r for r in rows if r[metric] is not None), key=lambda r: r[metric],
                    reverse=direction == "maximize") + [r for r in rows if r[metric] is None]
    lines = [_row(["trial", "state", metric, *params, *extra])]
    lines += [_row([r["trial"], r["state"], "-" if r[metric] is None else f"{r[metric]:.4f}",
                    *(r.get(p, "") for p in [*params, *extra])]) for r in ranked]
    return "\n".join(lines)


def _with(options: FinetuneOptions, params: dict[str, Any]) -> FinetuneOptions:
    """The pass's options with a trial's values (fine-tuning evaluates four times by default: the
    pruner decides on those)."""
    values, ours = options.model_dump(), olive_names(FinetuneOptions)
    for name, value in params.items():
        name = ours.get(name, ALIASES.get(name, name))
        if name in ("target_modules", "modules_to_save") and isinstance(value, str):
            value = value.split(",")
        values[name] = value
    return FinetuneOptions.build(**values)


def _sampler(kind: str, space: dict[str, Dimension], seed: int) -> Any:
    import optuna

    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed)

    class Grid(optuna.samplers.GridSampler):
        def after_trial(self, *args: Any) -> None:
            """optuna's grid stops the study when the grid is used up, which only works inside
            study.optimize; here the plan (never more trials than grid points) ends it."""

    return Grid({name: _grid(dim) for name, dim in space.items()}, seed=seed)


def _planned(strategy: Any, space: dict[str, Dimension]) -> int:
    """num_trials; for a grid, at most its number of points."""
    if strategy.type != "grid":
        return strategy.num_trials
    return min(strategy.num_trials, math.prod(len(_grid(dim)) for dim in space.values()))


def _grid(dim: Dimension) -> list[Any]:
    if dim.values is not None:
        return [_hashable(v) for v in dim.values]
    step = dim.step or 1
    count = int(round((dim.high - dim.low) / step)) + 1
    values = [dim.low + i * step for i in range(count)]
    return [int(v) for v in values] if dim.type == "int" else values


def _suggest(trial: Any, name: str, dim: Dimension) -> Any:
    if dim.type in ("choice", "categorical"):
        return trial.suggest_categorical(name, [_hashable(v) for v in dim.values])
    if dim.type == "int":
        return trial.suggest_int(name, int(dim.low), int(dim.high), step=int(dim.step or 1), log=dim.log)
    return trial.suggest_float(name, dim.low, dim.high, step=dim.step, log=dim.log)


def _hashable(value: Any) -> Any:
    """optuna's choices are scalars; a list choice (target_modules) travels as a comma-joined string."""
    return ",".join(value) if isinstance(value, list) else value


def _row(cells: list[Any]) -> str:
    return "  ".join(f"{_fmt(c):>12}" for c in cells)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)
