"""One Optuna study per (table, head): seeded TPE, pruning across folds, resumable.

The study name is derived from everything that makes trial values comparable
(table key, head, objective, folds, seed, class weights), and the study is
opened with ``load_if_exists=True``, so rerunning a killed search continues the
same study: only ``n_trials`` minus the finished trials (complete, pruned or
failed) are run, and a trial that was finished is never redone. Several
processes or machines pointing at one storage (PostgreSQL, or SQLite on one
machine) share the trials; ``MaxTrialsCallback`` stops them all at ``n_trials``.

A trial reports its score after every fold and a ``MedianPruner`` stops a
trial whose score falls below the median of earlier trials at the same fold,
from the first fold on (after five trials): a poor configuration costs one
fold instead of five, which is what keeps a 20-trial search of every head on
20,800 x 1,024 within reach of half an hour on two cores.

A trial that raises (NaN probabilities, divergence, bad parameters) is
recorded as FAIL with the reason in its ``fail_reason`` user attribute and the
search goes on. Keras heads fit their folds in a recycled child process
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
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

from classifiers.cv import Fold, cross_val_proba
from classifiers.metrics import Objective, score
from classifiers.registry import create_head, get_head_spec
from classifiers.workers import FoldWorker

#: Trial states that count as finished: never rerun, and counted toward ``n_trials``.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class TuningError(RuntimeError):
    """A search produced no completed trial; the message gives the failure reasons."""


def get_storage(storage: None | str | optuna.storages.BaseStorage = None, *,
                default_url: str | None = None) -> optuna.storages.BaseStorage:
    """An Optuna storage from ``None`` (``default_url``, else in memory), a URL or an object.

    URL storages get a heartbeat, so a trial of a killed process is marked
    FAIL after three minutes instead of staying RUNNING forever, and SQLite
    waits for a busy database instead of failing when several processes share it.
    """
    if isinstance(storage, optuna.storages.BaseStorage):
        return storage
    url = storage or default_url
    if url is None:
        return optuna.storages.InMemoryStorage()
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    try:
        with warnings.catch_warnings():
            # The heartbeat is "experimental" in Optuna; we rely on it knowingly.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                              heartbeat_interval=60, grace_period=180)
    except Exception as err:  # SQLAlchemy raises many types for a bad URL or driver
        raise ValueError(f"Cannot open Optuna storage {url!r}: {err}. Give an SQLAlchemy URL "
                         f"such as sqlite:///path/optuna.sqlite or "
                         f"postgresql://user@host/db.") from err


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
    oof: np.ndarray
    """``(n_rows, n_classes)`` out-of-fold probabilities of the best params; NaN on
    augmented rows (never scored)."""
    study_name: str | None = None
    n_complete: int = 0
    n_pruned: int = 0
    n_failed: int = 0
    n_resumed: int = 0
    """Trials already finished by earlier runs of the study when this one started."""
    trial_seconds: list[float] = field(default_factory=list)
    """Durations of the trials that completed in this call."""
    fail_reasons: list[str] = field(default_factory=list)


@dataclass
class _Problem:
    """The arrays and settings one objective evaluation needs."""

    head: str
    X: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    folds: list[Fold]
    objective: Objective

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

        def on_fold(k, y_fold, proba_fold):
            if trial is None:
                return
            value = score(self.objective, y_fold, proba_fold)
            if math.isfinite(value):
                trial.report(value, k)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"fold {k}: {value:.4f} below the median")

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
               study_name: str | None = None, search: bool = True) -> TuningResult:
    """Tune head ``head`` on ``X (n_rows, n_features)`` with the given folds.

    ``y (n_rows,)`` are the labels (class weights name them); ``groups`` the
    source image of each row. The objective's positive class and the columns
    of the out-of-fold probabilities follow ``numpy.unique(y)``.
    ``search=False`` skips Optuna and scores the head's default parameters
    (plus ``fixed_params``) once. ``fixed_params`` a head does not accept
    (``n_jobs`` for logreg) are dropped for that head.
    """
    problem = _Problem(head, X, np.asarray(y), groups, folds, objective)
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
        self.problem, self.fixed, self.seed = problem, fixed, seed
        self.spec = get_head_spec(problem.head)
        with _quiet_optuna():
            self.study = optuna.create_study(
                storage=get_storage(storage), study_name=name, direction="maximize",
                sampler=optuna.samplers.TPESampler(seed=seed),
                pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0),
                load_if_exists=True)
        self.best: tuple[int, float, np.ndarray] | None = None
        self.worker: FoldWorker | None = None
        self.durations: list[float] = []

    def objective(self, trial: optuna.Trial) -> float:
        started = time.perf_counter()
        try:
            params = {**self.spec.search_space(trial), **self.fixed}
            value, oof = self.problem.cross_validate(params, trial, self.worker)
        except optuna.TrialPruned:
            raise
        except Exception as err:
            trial.set_user_attr("fail_reason", f"{type(err).__name__}: {err}"[:2000])
            raise
        self.durations.append(time.perf_counter() - started)
        if self.best is None or value > self.best[1]:
            self.best = (trial.number, value, oof)
        return value

    def run(self, n_trials: int, timeout: float | None) -> TuningResult:
        self.resumed = done = self._count(FINISHED)
        # Reseed past the trials already done, so a resumed search does not
        # replay the random start-up suggestions of the first run.
        self.study.sampler = optuna.samplers.TPESampler(seed=self.seed + done)
        if n_trials > done:
            with _quiet_optuna():
                self.study.optimize(
                    self.objective, n_trials=n_trials - done, timeout=timeout,
                    catch=(Exception,),
                    callbacks=[MaxTrialsCallback(n_trials, states=FINISHED)])
        return self._result()

    def _count(self, states) -> int:
        return len(self.study.get_trials(deepcopy=False, states=states))

    def _result(self) -> TuningResult:
        fails = [t.user_attrs.get("fail_reason", "no reason recorded")
                 for t in self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))]
        if not self._count((TrialState.COMPLETE,)):
            listing = "; ".join(sorted(set(fails))[:5]) or "no trial finished"
            raise TuningError(f"Search of head {self.problem.head!r} (study "
                              f"{self.study.study_name}) has no completed trial: {listing}.")
        best = self.study.best_trial
        params = {**best.params, **self.fixed}
        if self.best is not None and self.best[0] == best.number:
            oof = self.best[2]
        else:
            # The best trial ran in an earlier process: recompute its predictions
            # (the folds and the head's seed make them the same).
            _, oof = self.problem.cross_validate(params, worker=self.worker)
        return TuningResult(
            self.problem.head, params, float(best.value), oof, self.study.study_name,
            n_complete=self._count((TrialState.COMPLETE,)),
            n_pruned=self._count((TrialState.PRUNED,)), n_failed=len(fails),
            n_resumed=self.resumed, trial_seconds=list(self.durations), fail_reasons=fails)
