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

The lock covers processes on one machine. A server database (PostgreSQL)
shared by several machines has no such lock: there each process still draws
its own parameters, but the last trials may overshoot ``n_trials`` by one per
extra process.
"""

from __future__ import annotations

import threading
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
    """A lock beside an SQLite database (``optuna.sqlite.lock``); a thread lock otherwise."""
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
    url = storage or default_url
    if url is None:
        return optuna.storages.InMemoryStorage()
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
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
        raise ValueError(f"Cannot open Optuna storage {url!r}: {err}. Give an SQLAlchemy URL "
                         f"such as sqlite:///path/optuna.sqlite or "
                         f"postgresql://user@host/db.") from err


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


def requeue_killed(study: optuna.Study) -> int:
    """Fail trials whose heartbeat stopped and queue killed trials' parameters again.

    Call it holding :func:`study_lock`, so that two processes never queue the
    same trial twice. Returns how many trials were queued.
    """
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
