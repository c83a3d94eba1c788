"""Optuna studies that several processes can share: storage, lock, seeds, killed trials.

Two searches of one study at once (two ``fit-heads`` on one store) must not
trip over each other, and a trial whose process was killed must run again:

* :func:`get_storage` opens an SQLite file under :func:`study_lock`, so two
  processes never both create its schema (``UNIQUE constraint failed:
  alembic_version``). The lock is a file beside the database; the search holds
  it while it counts the study's trials and starts one, so the count and the
  start are one step for every process on the machine.
* :class:`TrialSeededSampler` seeds TPE with ``seed + trial number``: trial
  numbers are unique within a study, so two processes started with the same
  seed draw different parameters, and one process alone stays reproducible.
* A URL storage gets a heartbeat; :func:`requeue_killed` marks a trial whose
  heartbeat stopped as failed (after :data:`GRACE_SECONDS`) and queues its
  parameters again, at most :data:`MAX_RETRIES` times, so a killed (or
  interrupted) trial is redone instead of lost or counted. A trial that raised
  carries a ``fail_reason`` user attribute; that is how the two are told apart.
* :func:`claim_refit` lets exactly one of the processes that finished a shared
  search refit its best trial; the others see the claim and stop.

On PostgreSQL the lock is an advisory lock of the server
(:class:`AdvisoryLock`), so processes on several machines sharing one
database count and start trials as one step too, and the lock of a killed
process goes with its connection. ``postgresql://`` URLs use psycopg 3 when
psycopg2 is not installed.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import filelock
import optuna
from optuna.trial import FrozenTrial, TrialState

from classifiers.errors import ClassifierError

#: Seconds between heartbeats of a running trial.
HEARTBEAT_SECONDS = 5
#: Seconds without a heartbeat after which a running trial counts as killed.
GRACE_SECONDS = 30
#: How often a killed trial's parameters are queued again before it counts as failed
#: (a configuration that always gets its process killed, e.g. out of memory).
MAX_RETRIES = 2
#: Longest wait for another process to finish counting and starting a trial.
LOCK_TIMEOUT = 600

FAIL_REASON = "fail_reason"
RETRY_OF = "retry_of"
ATTEMPT = "attempt"
WORKER = "worker"


def worker_name() -> str:
    """``host:pid``: unique among the processes sharing a study, on one machine or several."""
    return f"{socket.gethostname()}:{os.getpid()}"


def sqlite_file(storage: None | str | optuna.storages.BaseStorage) -> Path | None:
    """The database file of an SQLite URL or storage; None for any other storage."""
    url = getattr(storage, "url", storage)
    if not isinstance(url, str) or not url.startswith("sqlite"):
        return None
    import sqlalchemy

    try:
        database = sqlalchemy.engine.make_url(url).database
    except sqlalchemy.exc.ArgumentError:
        return None  # opening it will fail with the URL named
    return Path(database) if database and database != ":memory:" else None


def study_lock(storage: None | str | optuna.storages.BaseStorage):
    """A lock beside an SQLite database (``optuna.sqlite.lock``), a PostgreSQL advisory
    lock, or a thread lock for any other storage."""
    url = getattr(storage, "url", storage)
    if isinstance(url, str) and url.startswith("postgresql"):
        return AdvisoryLock(url)
    path = sqlite_file(storage)
    if path is None:
        return threading.RLock()
    if not path.parent.is_dir():  # a typo in a URL must not create folders
        raise ValueError(f"Cannot open Optuna storage {getattr(storage, 'url', storage)!r}: "
                         f"folder {path.parent} does not exist.")
    return filelock.FileLock(f"{path}.lock", timeout=LOCK_TIMEOUT)


def get_storage(storage: None | str | optuna.storages.BaseStorage = None, *,
                default_url: str | None = None, heartbeat_interval: int = HEARTBEAT_SECONDS,
                grace_period: int = GRACE_SECONDS) -> optuna.storages.BaseStorage:
    """An Optuna storage from ``None`` (``default_url``, else in memory), a URL or an object.

    URL storages get a heartbeat every ``heartbeat_interval`` seconds; a running
    trial without one for ``grace_period`` seconds counts as killed. SQLite waits
    for a busy database instead of failing when several processes share it.
    """
    if isinstance(storage, optuna.storages.BaseStorage):
        return storage
    url = postgres_driver(storage or default_url)
    if url is None:
        return optuna.storages.InMemoryStorage()
    engine_kwargs = ({"connect_args": {"timeout": 60}} if url.startswith("sqlite") else
                     {"connect_args": {"connect_timeout": 10}} if url.startswith("postgresql")
                     else None)  # an unreachable server fails in seconds, not minutes
    lock = study_lock(url)
    try:
        with lock, warnings.catch_warnings():
            # The heartbeat is "experimental" in Optuna; we rely on it knowingly.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                              heartbeat_interval=heartbeat_interval,
                                              grace_period=grace_period)
    except filelock.Timeout as err:
        raise ClassifierError(f"Optuna storage {url!r} stayed locked by another process "
                              f"for {LOCK_TIMEOUT} s ({err.lock_file}).") from err
    except Exception as err:  # SQLAlchemy raises many types for a bad URL or driver
        # The first line only: SQLAlchemy appends the SQL and a help link.
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"Cannot open Optuna storage {_shown(url)!r}: {reason}. Give an "
                         f"SQLAlchemy URL such as sqlite:///path/optuna.sqlite or "
                         f"postgresql://user@host/db.") from err


def postgres_driver(url: str | None) -> str | None:
    """``postgresql://`` as ``postgresql+psycopg://`` when psycopg2 (SQLAlchemy's default
    driver) is missing: psycopg 3 is the one the ``cluster`` extra installs."""
    if url is None or not url.startswith("postgresql://"):
        return url
    import importlib.util

    if importlib.util.find_spec("psycopg2") is not None:
        return url
    return "postgresql+psycopg://" + url[len("postgresql://"):]


def _shown(url: str) -> str:
    """``url`` with its password starred, for messages."""
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url


class AdvisoryLock:
    """One PostgreSQL session-level advisory lock per database, shared by every process.

    Held on a connection of its own, so the server drops it when the holder's
    connection dies (a killed process never leaves the study locked).
    Re-entrant within a process, like the file lock it stands in for.
    """

    KEY = 0x0F5A_0B7E  # any constant: every process must ask for the same one

    def __init__(self, url: str, timeout: float = LOCK_TIMEOUT):
        self.url, self.timeout = postgres_driver(url), timeout
        self._engine = self._conn = None
        self._depth = 0

    def acquire(self) -> None:
        import sqlalchemy

        if self._depth:
            self._depth += 1
            return
        if self._engine is None:
            self._engine = sqlalchemy.create_engine(self.url, poolclass=sqlalchemy.pool.NullPool)
        self._conn = self._engine.connect()
        deadline = time.monotonic() + self.timeout
        try_lock = sqlalchemy.text("SELECT pg_try_advisory_lock(:key)")
        while not self._conn.execute(try_lock, {"key": self.KEY}).scalar():
            self._conn.rollback()
            if time.monotonic() > deadline:
                self._conn.close()
                raise filelock.Timeout(f"advisory lock {self.KEY} of {_shown(self.url)}")
            time.sleep(0.02)
        self._conn.commit()
        self._depth = 1

    def release(self) -> None:
        import sqlalchemy

        self._depth -= 1
        if self._depth == 0:
            try:
                self._conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"),
                                   {"key": self.KEY})
                self._conn.commit()
            finally:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> AdvisoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """TPE whose random state for trial ``n`` is seeded with ``seed + n``.

    A sampler seeded once per process replays the same random start-up
    suggestions in every process (and in every resumed run); seeding by trial
    number gives each trial of a study its own draw, whichever process runs it.
    TPE keeps nothing between trials but its random state, so a fresh one per
    trial loses nothing.
    """

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._tpe = optuna.samplers.TPESampler(seed=seed)

    def before_trial(self, study, trial: FrozenTrial) -> None:
        self._tpe = optuna.samplers.TPESampler(seed=(self.seed + trial.number) % 2**32)
        self._tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space) -> dict[str, Any]:
        return self._tpe.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution) -> Any:
        return self._tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._tpe.after_trial(study, trial, state, values)


def is_killed(trial: FrozenTrial) -> bool:
    """A failed trial that did not raise: its process was killed or interrupted."""
    return trial.state == TrialState.FAIL and FAIL_REASON not in trial.user_attrs


def attempt(trial: FrozenTrial) -> int:
    """1 for a first run of its parameters, 2 for their first retry, ..."""
    return int(trial.user_attrs.get(ATTEMPT, 1))


def counted_failures(trials: list[FrozenTrial]) -> list[str]:
    """Reasons of the failed trials that count: raised, or killed too often to retry."""
    reasons = []
    for trial in trials:
        if trial.state != TrialState.FAIL:
            continue
        if not is_killed(trial):
            reasons.append(trial.user_attrs[FAIL_REASON])
        elif attempt(trial) > MAX_RETRIES:
            reasons.append(f"killed {attempt(trial)} times while running "
                           f"(out of memory?), parameters {trial.params}")
    return reasons


def requeue_killed(study: optuna.Study, *, fail_stale: bool = True) -> int:
    """Fail trials whose heartbeat stopped (``fail_stale``) and queue killed trials'
    parameters again.

    Call it holding :func:`study_lock`, so that two processes never queue the
    same trial twice. Returns how many trials were queued.
    """
    if fail_stale:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs[RETRY_OF] for t in trials if RETRY_OF in t.user_attrs}
    queued = 0
    for trial in trials:
        if is_killed(trial) and trial.number not in retried and attempt(trial) <= MAX_RETRIES:
            study.enqueue_trial(dict(trial.params), user_attrs={
                RETRY_OF: trial.number, ATTEMPT: attempt(trial) + 1})
            queued += 1
    return queued


REFIT = "refit"


def storage_time(storage: None | str | optuna.storages.BaseStorage) -> float:
    """Seconds since the epoch by the PostgreSQL server's clock, else by this machine's.

    Refit claims compare one worker's claim with another's start; workers on
    several machines share no clock but the database's.
    """
    url = getattr(storage, "url", storage)
    if not (isinstance(url, str) and url.startswith("postgresql")):
        return time.time()  # SQLite, memory: one machine
    import sqlalchemy

    with get_storage(storage).engine.connect() as connection:
        return float(connection.execute(sqlalchemy.text(
            "SELECT extract(epoch FROM clock_timestamp())")).scalar())


def claim_refit(storage: None | str | optuna.storages.BaseStorage, study_name: str, key: str,
                *, since: float, worker: str) -> str | None:
    """Claim the refit of a finished search; None if ``worker`` got it, else who has it.

    Workers sharing a study each finish the search; the first to claim ``key``
    (the best trial and the count of finished trials) refits, the others stop.
    A claim made before ``since`` (the start of this run, by :func:`storage_time`)
    belongs to an earlier run, which may have been killed while refitting: it is
    taken over.
    """
    storage = get_storage(storage)
    with study_lock(storage):
        study = optuna.load_study(study_name=study_name, storage=storage)
        claim = study.user_attrs.get(REFIT) or {}
        if claim.get("key") == key and claim.get("at", 0) >= since and claim["by"] != worker:
            return claim["by"]
        study.set_user_attr(REFIT, {"key": key, "by": worker, "at": storage_time(storage)})
    return None
