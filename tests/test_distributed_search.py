"""`slmops search` on a real PostgreSQL server shared by worker processes: the plan, a killed worker,
a database restart, and bad URLs. The server is the system's PostgreSQL, started by tests/postgres.py."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import TEMPLATE
from postgres import Postgres

from slmops.cli import main


@pytest.fixture(scope="module")
def postgres():
    server = Postgres()
    yield server
    server.remove()


def config(model: Path, data: Path, out: Path, trials: int, steps: int, **strategy) -> Path:
    cfg = {"model": {"type": "HfModel", "config": {"model_path": str(model)}},
           "data_configs": [{"name": "reviews", "type": "HuggingfaceContainer",
                             "load_dataset_config": {"data_files": str(data), "split": "train"},
                             "pre_process_data_config": {"text_template": TEMPLATE.replace("\\\\", "\\")}}],
           "passes": {"lora": {"type": "LoRA", "config": {"max_steps": steps, "per_device_train_batch_size": 4,
                                                          "save_steps": 2}}},
           "search_strategy": {"type": "random", "num_trials": trials, "seed": 3, **strategy},
           "search_space": {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
                            "lora_r": {"type": "int", "low": 2, "high": 8, "step": 2}},
           "output_dir": str(out)}
    path = out.parent / f"{out.name}.json"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return path


def worker(cfg: Path, storage: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "slmops", "search", "--config", str(cfg), "--storage", storage],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out


def study(url: str):
    import optuna

    from slmops.workflow.study import open_storage

    storage = open_storage(url, 1, 120)
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage)


def running_on(url: str, pid: int, seconds: float = 300) -> int:
    """The number of a trial that worker `pid` is running, once it has run for a moment."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            for t in study(url).trials:
                if t.state.name == "RUNNING" and t.user_attrs.get("worker", "").endswith(f":{pid}"):
                    time.sleep(1.5)
                    return t.number
        except ValueError:  # no study yet
            pass
        time.sleep(0.3)
    raise AssertionError(f"worker {pid} never ran a trial")


def test_two_workers_share_one_postgres_study(postgres, tiny_llama, sentiment_file, tmp_path, capsys):
    url = postgres.database("shared")
    cfg = config(tiny_llama, sentiment_file, tmp_path / "run", trials=4, steps=6)
    workers = [worker(cfg, url) for _ in range(2)]
    for w in workers:
        finish(w)
    trials = study(url).trials
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]  # the plan, exactly: none twice, none beyond
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert len({t.user_attrs["worker"] for t in trials}) == 2
    for t in trials:
        manifest = Path(t.user_attrs["folder"]) / "manifest.json"
        if t.state.name == "COMPLETE":
            assert t.user_attrs["fingerprint"] == hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
            assert t.user_attrs["metrics"]["eval_loss"] == pytest.approx(t.value)
    assert main(["search", "--config", str(cfg), "--storage", url, "--status"]) == 0
    shown = capsys.readouterr().out
    best = min((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert "4 planned" in shown and f"best so far: trial {best.number}" in shown
    assert best.user_attrs["folder"] in shown


def test_a_killed_workers_trial_is_run_again_by_the_other(postgres, tiny_llama, sentiment_file, tmp_path):
    url = postgres.database("killed")
    cfg = config(tiny_llama, sentiment_file, tmp_path / "run", trials=3, steps=40, heartbeat_interval=1,
                 grace_period=4, pruning=False)
    doomed, survivor = worker(cfg, url), worker(cfg, url)
    lost = running_on(url, doomed.pid)
    doomed.send_signal(signal.SIGKILL)
    doomed.communicate(timeout=60)
    finish(survivor)
    trials = study(url).trials
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert [t.number for t in failed] == [lost]
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") is not None]
    assert retry.system_attrs["failed_trial"] == lost and retry.state.name == "COMPLETE"
    assert retry.params == failed[0].params
    assert retry.user_attrs["worker"].endswith(f":{survivor.pid}")
    assert retry.user_attrs["folder"] == failed[0].user_attrs["folder"]  # same folder: resumed from its checkpoint
    assert len([t for t in trials if t.state.name == "COMPLETE"]) == 3 and len(trials) == 4


def test_a_worker_rides_out_a_database_restart(postgres, tiny_llama, sentiment_file, tmp_path):
    url = postgres.database("restart")
    cfg = config(tiny_llama, sentiment_file, tmp_path / "run", trials=2, steps=60, heartbeat_interval=1,
                 grace_period=60)
    w = worker(cfg, url)
    running_on(url, w.pid)
    postgres.stop()
    time.sleep(5)
    postgres.start()
    finish(w)
    trials = study(url).trials
    assert sorted(t.state.name for t in trials) == ["COMPLETE", "COMPLETE"]


def test_a_query_the_restart_cut_short_runs_again_and_other_errors_do_not(monkeypatch):
    """The restart test's race made deterministic: optuna wraps a query the server ended in a
    StorageInternalError; `patiently` runs it again, while an error in the data itself is raised at once."""
    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError

    from slmops.workflow import study as study_module

    monkeypatch.setattr(study_module.time, "sleep", lambda seconds: None)
    storage, calls = SimpleNamespace(grace_period=60), []

    def cut_short_twice() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise optuna.exceptions.StorageInternalError("commit") from OperationalError(
                "SELECT", {}, Exception("terminating connection due to administrator command"))
        return "done"
    assert study_module.patiently(storage, cut_short_twice, "test") == "done" and len(calls) == 3

    def bad_data() -> None:
        calls.append(1)
        raise optuna.exceptions.StorageInternalError("commit") from IntegrityError("INSERT", {}, Exception("dup"))
    with pytest.raises(optuna.exceptions.StorageInternalError):
        study_module.patiently(storage, bad_data, "test")
    assert len(calls) == 4
    storage.grace_period = -1  # the server never came back: the error is the caller's
    calls.clear()
    with pytest.raises(optuna.exceptions.StorageInternalError):
        study_module.patiently(storage, cut_short_twice, "test")
    assert len(calls) == 1


@pytest.mark.parametrize("storage, expected", [
    ("postgresql://nobody@127.0.0.1:1/none", "cannot connect to postgresql+psycopg://nobody@127.0.0.1:1/none"),
    ("postgresql://nobody:secret@127.0.0.1:1/none", "nobody:***@127.0.0.1:1"),
    ("mongodb://127.0.0.1/x", "cannot use this URL (Can't load plugin: sqlalchemy.dialects:mongodb)"),
    ("postgresql://nobody:secret@127.0.0.1:port/none", "cannot use this URL"),
])
def test_a_bad_storage_is_one_line_before_any_training(tiny_llama, sentiment_file, tmp_path, capsys, storage,
                                                       expected):
    cfg = config(tiny_llama, sentiment_file, tmp_path / "run", trials=2, steps=2)
    assert main(["search", "--config", str(cfg), "--storage", storage]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and "secret" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "lora" / "trials").exists()
