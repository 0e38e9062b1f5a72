"""The optuna study behind `slmops search`, shared by worker processes on one machine or many.

optuna keeps the study in a database (SQLite for one machine, PostgreSQL for many) and hands each
worker its trials. What it leaves open, and this module adds:
- a plan: exactly `num_trials` trials start across all workers. Counting the trials and asking for a
  new one happen under a study lock (a PostgreSQL advisory lock, or a file lock beside a SQLite file),
  so two workers never both take the last one;
- dead workers: a running trial's heartbeat goes into the database every `heartbeat_interval`
  seconds. Once it is `grace_period` seconds old, the next worker to look marks the trial failed and
  queues it again, once (optuna's RetryHeartbeatStaleTrialCallback), with its parameters; a worker
  with nothing left to start waits for the trials still running elsewhere, so none is left behind.
  Ctrl-C hands the running trial back the same way, at once;
- outages: a connection lost mid-study is opened again, waiting up to `grace_period` seconds for the
  server; a query the restart cut short is run again (`patiently`), and heartbeats keep trying through
  it (optuna's own heartbeat thread ends at its first error);
- a wrong URL or an unreachable server is one line before any trial starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from slmops.errors import Interrupted, UsageError, first_line

log = logging.getLogger(__name__)
T = TypeVar("T")


def open_storage(url: str, heartbeat_interval: int, grace_period: int) -> Any:
    """optuna's RDBStorage on `url`, with heartbeats, one retry of a dead worker's trial, and
    reconnection; a URL that does not lead to a database is a UsageError naming the fix."""
    import optuna
    from sqlalchemy import event

    url = check_storage(url)
    storage = None
    for attempt in range(5):  # workers started together on a new database race to create its tables
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(
                    url, engine_kwargs=_engine_kwargs(url), heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
            break
        except Exception as err:  # noqa: BLE001  (sqlalchemy's IntegrityError / OperationalError)
            if attempt == 4:
                raise UsageError(f"search_strategy.storage: cannot open the study database: {first_line(err)}")
            time.sleep(1 + attempt)
    event.listen(storage.engine, "do_connect", _patient_connect(grace_period))
    return storage


def check_storage(url: str) -> str:
    """The URL as SQLAlchemy should open it, once a database answers there; a UsageError otherwise.
    `postgresql://` means psycopg2 to SQLAlchemy; slmops installs psycopg 3, used when psycopg2 is absent."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg2") is None:
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    if url.startswith("sqlite"):  # a local file: created on first use
        return url
    try:
        shown = make_url(url).render_as_string(hide_password=True)
        engine = create_engine(url, **_engine_kwargs(url))
    except ImportError as err:
        raise UsageError(f"search_strategy.storage: the database driver is not installed ({first_line(err)}); "
                         f"pip install 'slmops[search]'")
    except Exception as err:  # noqa: BLE001  (ArgumentError, NoSuchModuleError: not a URL SQLAlchemy knows)
        why = first_line(err).replace(url, "the URL")  # it may carry a password
        raise UsageError(f"search_strategy.storage: cannot use this URL ({why}); write it as "
                         f"postgresql://USER:PASSWORD@HOST:5432/DATABASE or sqlite:///PATH")
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as err:  # noqa: BLE001  (OperationalError and the drivers' own)
        raise UsageError(f"search_strategy.storage: cannot connect to {shown}: {first_line(err)}; start the "
                         f"server, or check the host, port, user, password and database name")
    finally:
        engine.dispose()
    return url


def _engine_kwargs(url: str) -> dict:
    if url.startswith("sqlite"):  # workers on one machine queue for the file's lock
        return {"connect_args": {"timeout": 120}}
    return {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}  # a dropped connection is renewed


def _retried(call: Callable[[], T], patience: float, transient: Callable[[Exception], bool], what: str) -> T:
    """`call`, run again every 2 s for up to `patience` seconds while it fails with a `transient` error;
    any other error, or one past the deadline, is raised."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return call()
        except Exception as err:  # noqa: BLE001  `transient` decides which are tried again
            if not transient(err) or time.monotonic() > deadline:
                raise
            log.warning("%s (%s); trying again", what, first_line(err.__cause__ or err))
            time.sleep(2)


def _patient_connect(patience: int) -> Callable:
    """A connection that fails to open is tried again every 2 s for `patience` seconds, so a worker
    rides out a database restart; with pool_pre_ping, every stale pooled connection comes through here."""
    def connect(dialect: Any, conn_rec: Any, cargs: tuple, cparams: dict) -> Any:
        def refused(err: Exception) -> bool:
            return isinstance(err, dialect.loaded_dbapi.OperationalError)
        return _retried(lambda: dialect.connect(*cargs, **cparams), patience, refused, "study database unreachable")
    return connect


def patiently(storage: Any, call: Callable[[], T], what: str) -> T:
    """`call`, run again every 2 s for up to the storage's grace period while the database cuts it short:
    a server restart ends the queries in flight, which optuna reports as a StorageInternalError (opening
    a new connection already waits, in `_patient_connect`). Other errors are raised at once."""
    from sqlalchemy.exc import OperationalError

    def dropped(err: Exception) -> bool:
        return isinstance(err, OperationalError) or isinstance(err.__cause__, OperationalError)
    return _retried(call, storage.grace_period, dropped, f"{what}: the study database dropped the query")


@contextlib.contextmanager
def study_lock(storage: Any, study_name: str) -> Iterator[None]:
    """Held while a worker counts the trials and asks for the next one."""
    engine = storage.engine
    if engine.dialect.name == "postgresql":
        from sqlalchemy import text

        key = int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True)
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    elif engine.dialect.name == "sqlite" and engine.url.database:
        import fcntl  # POSIX; SQLite workers share one machine

        with open(Path(engine.url.database).with_suffix(".lock"), "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
    else:  # other databases: workers may start a trial or two beyond the plan
        yield


class Heartbeat:
    """Beats for one running trial in a thread, through database outages."""

    def __init__(self, storage: Any, trial_id: int, interval: int):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def __enter__(self) -> Heartbeat:
        self.storage.record_heartbeat(self.trial_id)
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as err:  # noqa: BLE001  an outage: the next beat tries again
                log.warning("trial heartbeat not recorded (%s)", first_line(err))


def slots(trials: list[Any]) -> list[Any]:
    """The trials that fill the plan: all but those failed and queued again (their retry fills it)."""
    import optuna

    requeued = {t.system_attrs["retry_history"][-1] for t in trials if t.system_attrs.get("retry_history")}
    return [t for t in trials if not (t.state == optuna.trial.TrialState.FAIL and t.number in requeued)]


def work(study: Any, storage: Any, planned: int, objective: Callable[[Any], float],
         shown: Callable[[Any], None], deadline: float | None, interval: int) -> None:
    """Run this worker's share of the plan; return when every planned trial has finished somewhere."""
    import optuna

    state = optuna.trial.TrialState
    waited_for: set[int] = set()
    while True:
        with study_lock(storage, study.study_name):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
            trials = study.get_trials(deepcopy=False)
            timely = deadline is None or time.monotonic() < deadline
            waiting = any(t.state == state.WAITING for t in trials)
            trial = study.ask() if timely and (waiting or len(slots(trials)) < planned) else None
        if trial is not None:
            shown(run_trial(study, storage, trial, objective, interval))
            continue
        running = [t for t in trials if t.state == state.RUNNING]
        if not running or not timely:
            return
        for t in running:
            if t.number not in waited_for:
                log.info("waiting for trial %d on %s", t.number, t.user_attrs.get("worker", "another worker"))
                waited_for.add(t.number)
        time.sleep(interval)


def run_trial(study: Any, storage: Any, trial: Any, objective: Callable[[Any], float], interval: int) -> Any:
    """One trial under a heartbeat; returns it frozen, as the study recorded it."""
    import optuna

    state = optuna.trial.TrialState
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name),
                                                               trial.number)
    with Heartbeat(storage, trial_id, interval):
        try:
            value, outcome = objective(trial), state.COMPLETE
        except optuna.TrialPruned:
            value, outcome = None, state.PRUNED
        except (KeyboardInterrupt, Interrupted):
            study.tell(trial, state=state.FAIL)
            requeue = storage.get_heartbeat_stale_trial_callback()  # handed back to the next worker, or to
            requeue(study, storage.get_trial(trial_id))             # this command run again
            raise
        except BaseException:
            study.tell(trial, state=state.FAIL)
            raise
    try:
        patiently(storage, lambda: study.tell(trial, value, state=outcome), f"trial {trial.number}'s result")
    except optuna.exceptions.UpdateFinishedTrialError:
        log.warning("trial %d was taken for dead while it ran here (no heartbeat for %ss) and queued again; "
                    "this result is kept in its folder but not counted", trial.number, storage.grace_period)
    return storage.get_trial(trial_id)
