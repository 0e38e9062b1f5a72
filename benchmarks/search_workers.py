"""Search workers sharing one PostgreSQL study: one worker against two, and two with one killed.

Starts a throwaway PostgreSQL server (tests/postgres.py; or --storage URL for your own), then runs
the same search of `--trials` short LoRA trials on SmolLM2-135M-Instruct and SST-2 three ways, one
after the other, each on a fresh database:
  1 worker | 2 workers | 2 workers, one SIGKILLed in the middle of a trial.
Prints a markdown table: wall time, trials in the study, trials lost (planned and never finished),
duplicated (started beyond the plan), retried after the kill, mean seconds per trial, and the
database's share of a trial (the time a trial is open in the study but not training: asking, the
heartbeat, recording the result).

    python benchmarks/search_workers.py --trials 8 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from postgres import Postgres  # noqa: E402
from tables import markdown  # noqa: E402

from slmops.workflow.study import open_storage, slots  # noqa: E402

TEMPLATE = "<|im_start|>user\n{phrase}<|im_end|>\n<|im_start|>assistant\n{tone}<|im_end|>"


def workflow(out: Path, trials: int, steps: int, data: str) -> Path:
    cfg = {"input_model": {"type": "HfModel", "config": {"model_path": "smollm2-135m-instruct"}},
           "data_configs": [{"name": "sst2", "type": "HuggingfaceContainer",
                             "load_dataset_config": {"data_files": data, "split": "train[:512]"},
                             "pre_process_data_config": {"text_template": TEMPLATE}}],
           "passes": {"lora": {"type": "LoRA", "config": {"max_steps": steps, "per_device_train_batch_size": 8,
                                                          "eval_split": "train[-64:]", "save_steps": 5}}},
           "search_strategy": {"type": "tpe", "num_trials": trials, "seed": 0, "heartbeat_interval": 2,
                               "grace_period": 10},
           "search_space": {"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
                            "lora_r": {"type": "choice", "values": [4, 8, 16]}},
           "output_dir": str(out)}
    path = out.with_suffix(".json")
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return path


def start(cfg: Path, url: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "slmops", "search", "--config", str(cfg), "--storage", url],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def running_on(url: str, pid: int) -> int:
    while True:
        for t in study(url).trials:
            if t.state.name == "RUNNING" and t.user_attrs.get("worker", "").endswith(f":{pid}"):
                return t.number
        time.sleep(0.5)


def study(url: str):
    import optuna

    storage = open_storage(url, 2, 10)
    while not optuna.get_all_study_summaries(storage):
        time.sleep(0.5)
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage)


def run(label: str, cfg: Path, url: str, workers: int, kill: bool, planned: int) -> dict:
    started = time.perf_counter()
    procs = [start(cfg, url) for _ in range(workers)]
    if kill:
        running_on(url, procs[0].pid)
        time.sleep(5)  # well into the trial: the model is loaded and training
        procs[0].send_signal(signal.SIGKILL)
    for p in procs:
        _, err = p.communicate()
        if p.returncode not in (0, -signal.SIGKILL):
            raise SystemExit(f"{label}: a worker failed:\n{err[-3000:]}")
    wall = time.perf_counter() - started
    trials = study(url).trials
    planned_slots = slots(trials)  # a trial failed and queued again is its rerun's slot
    finished = [t for t in planned_slots if t.state.name in ("COMPLETE", "PRUNED")]
    timed = [t for t in finished if t.user_attrs.get("seconds") is not None and t.datetime_complete]
    open_s = [(t.datetime_complete - t.datetime_start).total_seconds() for t in timed]
    return {"run": label, "wall_s": round(wall, 1), "trials": len(trials), "lost": planned - len(finished),
            "duplicated": max(len(planned_slots) - planned, 0), "retried": sum(1 for t in trials if t.system_attrs.get(
                "failed_trial") is not None),
            "trial_s": round(sum(t.user_attrs["seconds"] for t in timed) / max(len(timed), 1), 1),
            "db_s_per_trial": round(sum(o - t.user_attrs["seconds"] for o, t in zip(open_s, timed))
                                    / max(len(timed), 1), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2" / "train.jsonl"))
    ap.add_argument("--storage", help="a PostgreSQL server URL whose user may CREATE DATABASE (default: start one)")
    args = ap.parse_args()
    server = None if args.storage else Postgres()
    base = args.storage or server.url
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="slmops-search-bench-") as tmp:
            for i, (label, workers, kill) in enumerate([("1 worker", 1, False), ("2 workers", 2, False),
                                                        ("2 workers, one killed", 2, True)]):
                name = f"bench_{os.getpid()}_{i}"
                if server is not None:
                    url = server.database(name)
                else:
                    import psycopg

                    with psycopg.connect(base, autocommit=True) as conn:
                        conn.execute(f"CREATE DATABASE {name}")
                    url = base.rsplit("/", 1)[0] + f"/{name}"
                cfg = workflow(Path(tmp) / f"run{i}", args.trials, args.steps, args.data)
                rows.append(run(label, cfg, url, workers, kill, args.trials))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        if server is not None:
            server.remove()
    print(markdown(rows))


if __name__ == "__main__":
    main()
