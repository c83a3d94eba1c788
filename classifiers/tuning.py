"""One Optuna study per (table, head): seeded TPE, pruning across folds, resumable, shareable.

The study name is derived from everything that makes trial values comparable
(table key, head, objective, folds, seed, class weights), and the study is
opened with ``load_if_exists=True``, so rerunning a killed search continues the
same study and a trial that was finished is never redone.

``n_trials`` is the number of trials with a result, COMPLETE or PRUNED (a
pruned trial is a finished verdict on its parameters), however many runs and
processes contribute. Several processes on one storage share the study (see
:mod:`classifiers.studies`): on SQLite they count and start trials under one
file lock, so together they end with exactly ``n_trials`` and each trial draws
its own parameters; a process that finds the study full waits for the trials
still running elsewhere, so its result is the whole study's. A trial whose
process was killed is queued again with its parameters and does not count.

A trial that raises (NaN probabilities, divergence, bad parameters) is
recorded as FAIL with the reason in its ``fail_reason`` user attribute and the
search goes on with another trial; it does not count toward ``n_trials``
either, but a study stops taking trials once ``n_trials`` of them have
failed, so a head that always fails ends with :class:`TuningError`.

Folds are the budget of successive halving (``pruner="halving"``, the
default; Optuna's asynchronous ``SuccessiveHalvingPruner``, reduction factor 3):
a trial reports the mean score of its folds so far after every fold; after one
fold it must be in the top third of the trials that got that far to earn two
more, and after three folds in the top third again to earn the last two. Most
trials cost one fold, the promising ones all five, and workers sharing a study
never wait for each other's rungs. ``pruner="median"`` is the earlier rule: a
``MedianPruner`` stopped a trial whose fold score fell below the median of
earlier trials at the same fold, after five unpruned trials (28.3 min for six
heads x 20 trials on 20,800 x 1,024 on two cores; see ``benchmarks/bench_heads.py``).

Keras heads fit their folds in a recycled child process
(:mod:`classifiers.workers`), because TensorFlow keeps memory per trained model
that ``clear_session`` does not return; memory stays bounded from trial to trial.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import filelock
import numpy as np
import optuna
from optuna.trial import TrialState

from classifiers.cv import Fold, cross_val_proba
from classifiers.errors import ClassifierError
from classifiers.metrics import Objective, score
from classifiers.registry import create_head, get_head_spec
from classifiers.studies import (FAIL_REASON, GRACE_SECONDS, LOCK_TIMEOUT, WORKER,
                                 TrialSeededSampler, counted_failures, get_storage, is_killed,
                                 requeue_killed, study_lock, worker_name)
from classifiers.workers import FoldWorker

__all__ = ["PRUNERS", "TuningError", "TuningResult", "get_storage", "head_fixed_params",
           "make_pruner", "study_name", "tune_head"]

_log = logging.getLogger(__name__)


class TuningError(ClassifierError):
    """A search produced no completed trial; the message gives the failure reasons."""


PRUNERS = ("halving", "median")


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    """The pruner ``halving`` (folds as the budget) or ``median`` (the earlier rule)."""
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
    raise ClassifierError(f"Unknown pruner {name!r}. Available: {', '.join(PRUNERS)}.")


def study_name(table_key: str, head: str, objective: Objective, *, cv: int, seed: int,
               fixed_params: Mapping[str, Any] | None = None) -> str:
    """Readable, stable study name: ``<table key>/<head>/<objective>/cv5-seed0-<hash>``.

    The hash covers the fixed parameters (class weights, ...), so a search with
    other fixed settings never mixes its trial values into this study.
    """
    fixed = json.dumps(dict(fixed_params or {}), sort_keys=True, default=str)
    extra = json.dumps([objective.positive, fixed], default=str)
    digest = hashlib.sha256(extra.encode()).hexdigest()[:8]
    return f"{table_key}/{head}/{objective.label}/cv{cv}-seed{seed}-{digest}"


@dataclass
class TuningResult:
    """What :func:`tune_head` found for one head."""

    head: str
    params: dict[str, Any]
    """Full constructor parameters of the best trial (search space plus fixed ones)."""
    value: float
    """Objective value of the best trial on the pooled out-of-fold predictions."""
    _oof: np.ndarray | Callable[[], np.ndarray]
    """The array of :attr:`oof`, or the function that computes it."""
    study_name: str | None = None
    n_complete: int = 0
    n_pruned: int = 0
    n_failed: int = 0
    n_resumed: int = 0
    """Trials already counted (complete, pruned, failed) when this call started."""
    n_retried: int = 0
    """Trials of killed processes that this call queued again with their parameters."""
    trial_seconds: list[float] = field(default_factory=list)
    """Durations of the trials that completed in this call."""
    fail_reasons: list[str] = field(default_factory=list)
    best_trial: int | None = None
    """Number of the best trial in the study (None without a search)."""

    @property
    def oof(self) -> np.ndarray:
        """``(n_rows, n_classes)`` out-of-fold probabilities of the best params; NaN on
        augmented rows (never scored).

        When the best trial ran in another process they are recomputed on first
        use (one cross-validation), so a worker that leaves the refit to another
        never pays for them.
        """
        if callable(self._oof):
            self._oof = self._oof()
        return self._oof


@dataclass
class _Problem:
    """The arrays and settings one objective evaluation needs."""

    head: str
    X: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    folds: list[Fold]
    objective: Objective
    pruner: str = "halving"

    def __post_init__(self):
        self.classes = np.unique(self.y)
        self.y_enc = np.searchsorted(self.classes, self.y)

    def raw_rows(self) -> np.ndarray:
        return np.concatenate([f.test for f in self.folds])

    def cross_validate(self, params: Mapping[str, Any], trial=None,
                       worker: FoldWorker | None = None) -> tuple[float, np.ndarray]:
        """Pooled out-of-fold objective value and ``(n_rows, n_classes)`` probabilities.

        With a ``worker``, folds are fitted in its child process.
        """
        spec = get_head_spec(self.head)
        scores: list[float] = []

        def on_fold(k, y_fold, proba_fold):
            if trial is None:
                return
            value = score(self.objective, y_fold, proba_fold)
            if math.isfinite(value):
                scores.append(value)
                # Halving's rungs count folds done; a mean over them is steadier than one fold.
                trial.report(*((float(np.mean(scores)), len(scores)) if self.pruner == "halving"
                               else (value, k)))
                # After the last fold the trial's result is paid for: keep it.
                if k < len(self.folds) - 1 and trial.should_prune():
                    raise optuna.TrialPruned(f"fold {k}: {value:.4f}, pruned ({self.pruner})")

        oof = cross_val_proba(lambda: create_head(self.head, **params), self.X, self.y,
                              self.groups, self.folds, self.classes, on_fold=on_fold,
                              after_fold=spec.cls.clear_backend,
                              fit_predict=None if worker is None else
                              lambda fold: worker.fit_predict(self.head, params, fold))
        rows = self.raw_rows()
        value = score(self.objective, self.y_enc[rows], oof[rows])
        if not math.isfinite(value):
            raise FloatingPointError(f"objective {self.objective.label} is {value}")
        return value, oof


@contextlib.contextmanager
def _quiet_optuna():
    """Silence Optuna's per-trial INFO lines; failures still log as warnings."""
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(previous)


def head_fixed_params(head: str, fixed: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``fixed`` that head ``head`` accepts (e.g. no ``n_jobs`` for logreg)."""
    accepted = set(create_head(head).get_params())
    return {k: v for k, v in fixed.items() if k in accepted}


def tune_head(head: str, X: np.ndarray, y: np.ndarray, groups: np.ndarray,
               folds: list[Fold], *, objective: Objective, n_trials: int = 20,
               timeout: float | None = None, seed: int = 0,
               fixed_params: Mapping[str, Any] | None = None,
               storage: None | str | optuna.storages.BaseStorage = None,
               study_name: str | None = None, search: bool = True,
               pruner: str = "halving") -> TuningResult:
    """Tune head ``head`` on ``X (n_rows, n_features)`` with the given folds.

    ``y (n_rows,)`` are the labels (class weights name them); ``groups`` the
    source image of each row. The objective's positive class and the columns
    of the out-of-fold probabilities follow ``numpy.unique(y)``.
    ``search=False`` skips Optuna and scores the head's default parameters
    (plus ``fixed_params``) once. ``fixed_params`` a head does not accept
    (``n_jobs`` for logreg) are dropped for that head. ``pruner``: see :data:`PRUNERS`.
    """
    make_pruner(pruner)  # an unknown name fails before any work
    problem = _Problem(head, X, np.asarray(y), groups, folds, objective, pruner)
    fixed = head_fixed_params(head, fixed_params or {})
    if not search:
        started = time.perf_counter()
        value, oof = problem.cross_validate(fixed)
        return TuningResult(head, fixed, value, oof, n_complete=1,
                            trial_seconds=[time.perf_counter() - started])
    search_ = _Tuning(problem, fixed, storage, study_name, seed)
    if not search_.spec.uses_keras:
        return search_.run(n_trials, timeout)
    with FoldWorker(X, np.asarray(y), groups) as search_.worker:
        return search_.run(n_trials, timeout)


class _Tuning:
    """Runs one study; keeps the best out-of-fold predictions computed in this process."""

    def __init__(self, problem: _Problem, fixed: dict, storage, name: str | None, seed: int):
        self.problem, self.fixed = problem, fixed
        self.spec = get_head_spec(problem.head)
        self.storage = get_storage(storage)
        self.lock, self.holding = study_lock(self.storage), False
        self._acquire()
        try:
            with _quiet_optuna():
                self.study = optuna.create_study(
                    storage=self.storage, study_name=name, direction="maximize",
                    sampler=TrialSeededSampler(seed),
                    pruner=make_pruner(problem.pruner),
                    load_if_exists=True)
        finally:
            self._release()
        self.best: tuple[int, float, np.ndarray] | None = None
        self.worker: FoldWorker | None = None
        self.durations: list[float] = []
        self.retried, self.current, self.stale_check_at = 0, -1, 0.0

    def objective(self, trial: optuna.Trial) -> float:
        started, self.current = time.perf_counter(), trial.number
        # The trial is stored as running: other processes may count it and start theirs
        # while it draws its parameters (seeded by its number, so never the same draw).
        self._release()
        trial.set_user_attr(WORKER, worker_name())  # which of the workers sharing the study ran it
        try:
            params = {**self.spec.search_space(trial), **self.fixed}
            value, oof = self.problem.cross_validate(params, trial, self.worker)
        except optuna.TrialPruned:
            raise
        except Exception as err:
            trial.set_user_attr(FAIL_REASON, f"{type(err).__name__}: {err}"[:2000])
            raise
        self.durations.append(time.perf_counter() - started)
        if self.best is None or value > self.best[1]:
            self.best = (trial.number, value, oof)
        return value

    def run(self, n_trials: int, timeout: float | None) -> TuningResult:
        deadline = None if timeout is None else time.monotonic() + timeout
        done, _, failed = self._counts()
        self.resumed = done + failed
        waited = False
        while True:
            running = self._start_trial(n_trials, deadline)
            if running is None:
                continue
            if not running or not self._heartbeat or _past(deadline):
                break
            if not waited:
                _log.warning("Study %s: waiting for %d trial(s) running in another process, "
                             "or killed (then retried once their heartbeat is %d s old).",
                             self.study.study_name, running,
                             getattr(self.storage, "grace_period", None) or GRACE_SECONDS)
                waited = True
            time.sleep(1)
        return self._result()

    def _start_trial(self, n_trials: int, deadline: float | None) -> int | None:
        """Run one more trial (None), or say how many trials still run elsewhere.

        Counting and starting happen under the study lock, so processes sharing
        the study never start more trials than it lacks.
        """
        self._acquire()
        try:
            # A heartbeat goes stale only after a grace period: no need to look every trial.
            stale_check = time.monotonic() >= self.stale_check_at
            self.retried += requeue_killed(self.study, fail_stale=stale_check)
            if stale_check:
                self.stale_check_at = time.monotonic() + (
                    getattr(self.storage, "heartbeat_interval", None) or 0)
            done, running, failed = self._counts()
            if done + running >= n_trials or failed >= n_trials or _past(deadline):
                return running
            try:
                with _quiet_optuna():
                    self.study.optimize(self.objective, n_trials=1, catch=(Exception,))
            except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
                if not self._taken_over():
                    raise
            return None
        finally:
            self._release()  # if the trial did not get as far as its parameters

    def _taken_over(self) -> bool:
        """Whether another process declared the current trial killed and queued it again.

        That happens when this process gave no heartbeat for the grace period
        (suspended, or starved): Optuna then refuses to record the trial here.
        """
        trial = next(t for t in self.study.get_trials(deepcopy=False) if t.number == self.current)
        if not is_killed(trial):
            return False
        _log.warning("Study %s: trial %d was declared killed by another process (no heartbeat "
                     "in time) and queued again; going on.", self.study.study_name, trial.number)
        if self.best is not None and self.best[0] == trial.number:
            self.best = None
        return True

    def _acquire(self) -> None:
        try:
            self.lock.acquire()
        except filelock.Timeout as err:
            raise TuningError(f"Another process held the study lock {err.lock_file} "
                              f"for {LOCK_TIMEOUT} s.") from err
        self.holding = True

    def _release(self) -> None:
        if self.holding:
            self.holding = False
            self.lock.release()

    @property
    def _heartbeat(self) -> bool:
        # Without a heartbeat a killed process's trial would look alive for ever.
        return getattr(self.storage, "heartbeat_interval", None) is not None

    def _counts(self) -> tuple[int, int, int]:
        """``(complete + pruned, running, counted failures)`` of the whole study."""
        trials = self.study.get_trials(deepcopy=False)
        states = Counter(t.state for t in trials)
        return (states[TrialState.COMPLETE] + states[TrialState.PRUNED],
                states[TrialState.RUNNING], len(counted_failures(trials)))

    def _result(self) -> TuningResult:
        trials = self.study.get_trials(deepcopy=False)
        states = Counter(t.state for t in trials)
        fails = counted_failures(trials)
        if not states[TrialState.COMPLETE]:
            listing = "; ".join(r.rstrip(".") for r in sorted(set(fails))[:5])
            raise TuningError(f"Search of head {self.problem.head!r} (study "
                              f"{self.study.study_name}) has no completed trial: "
                              f"{listing or 'no trial finished'}.")
        best = self.study.best_trial
        params = {**best.params, **self.fixed}
        if self.best is not None and self.best[0] == best.number:
            oof = self.best[2]
        else:
            # The best trial ran in another process: its predictions are recomputed
            # when needed (the folds and the head's seed make them the same).
            oof = self._recompute(params)
        return TuningResult(
            self.problem.head, params, float(best.value), oof, self.study.study_name,
            n_complete=states[TrialState.COMPLETE], n_pruned=states[TrialState.PRUNED],
            n_failed=len(fails), n_resumed=self.resumed, n_retried=self.retried,
            trial_seconds=list(self.durations), fail_reasons=fails, best_trial=best.number)


    def _recompute(self, params: dict) -> Callable[[], np.ndarray]:
        problem, uses_keras = self.problem, self.spec.uses_keras

        def oof() -> np.ndarray:
            if not uses_keras:
                return problem.cross_validate(params)[1]
            with FoldWorker(problem.X, problem.y, problem.groups) as worker:
                return problem.cross_validate(params, worker=worker)[1]
        return oof


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline
