"""``featurestore fit-heads``: tune classifier heads on a feature table, fairly and leak-free.

For each head: an Optuna search over grouped, stratified folds of the table's
``train`` split (augmented views only ever train; scoring uses raw images),
then the decision threshold from the out-of-fold predictions (recall floor),
a refit of the best parameters on the whole ``train`` split, an evaluation on
the held-out raw rows of ``test`` (or ``val``), and the model, its lineage and
its out-of-fold probabilities saved in the store. The manifest's val/test rows
are never seen by the search. A leaderboard row per (table, head, objective)
lands in ``STORE/leaderboard.parquet``.

``view`` (``--view NAME``) trains on a cleaned view from ``audit-labels``: its
dropped images (with their augmented rows) leave the train split and its
relabels apply there; the held-out split changes only when the view was made
from an explicit held-out audit. Models go to ``<head>@<view>``, leaderboard
rows carry ``view``, and each view revision gets its own Optuna study.

Python users call :func:`run_fit_heads` with a :class:`FitHeadsConfig`; the
Click command is a thin layer over it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import pandas as pd

from classifiers.cv import grouped_folds
from classifiers.errors import ClassifierError
from classifiers.metrics import (OBJECTIVES, Objective, decide, evaluation_report,
                                 make_objective, recall_floor_threshold)
from classifiers.registry import create_head, get_head_spec, list_heads
from classifiers.selection import select_ensemble
from classifiers.studies import storage_time
from classifiers.tuning import PRUNERS, TuningResult, study_name, tune_head
from featurestore import FeatureArrays, FeatureStoreError, Store, TableReader
from featurestore._io import utc_now
from featurestore.views import View, ViewStore, apply_view
from pipelines.heads.leaderboard import format_leaderboard, head_row, update_leaderboard
from pipelines.heads.shared import claim_study, refit_claimant, run_workers
from pipelines.heads.models import save_model
from pipelines.heads.predictions import prediction_files

SEARCHES = ("optuna", "none")


@dataclass
class FitHeadsConfig:
    store: Path
    """Store folder holding the feature table."""
    table: str
    """Lineage query or key of the table, e.g. ``densenet121/max``."""
    heads: Sequence[str] = ("logreg",)
    """Registered head names (see ``classifiers.list_heads()``)."""
    search: str = "optuna"
    """``optuna`` to tune, ``none`` to cross-validate each head's defaults once."""
    n_trials: int = 20
    """Trials with a result (complete or pruned) per head, counting those of earlier or
    concurrent runs of the same study; failed and killed trials do not count."""
    timeout: float | None = None
    """Seconds of searching per head in this run (None: no limit)."""
    cv: int = 5
    """Folds of the grouped, stratified cross-validation."""
    metric: str | None = None
    """Objective (see ``classifiers.metrics.OBJECTIVES``); default recall_floor when
    ``min_recall`` is set, else balanced_accuracy."""
    positive_class: str | None = None
    """Label of the class whose recall matters (binary default: the second label)."""
    min_recall: float | None = None
    """Recall floor of the positive class; sets the decision threshold from OOF predictions."""
    class_weight: str | dict | None = None
    """``balanced``, ``none``, ``{label: weight}`` or a string ``0:3,1:1``."""
    storage: str | None = None
    """Optuna storage URL; default ``sqlite:///STORE/optuna.sqlite``."""
    n_jobs: int | None = None
    """Threads per fit for heads that take them (xgboost, knn); None: each library's
    default (every core for XGBoost, one for the neighbour search)."""
    seed: int = 0
    """Seed of the folds, the TPE sampler and the heads."""
    eval_split: str | None = None
    """Held-out split to evaluate on: ``test``, ``val``; default test if it has rows, else val."""
    view: str | None = None
    """Cleaned view to train on (``featurestore audit-labels``): its drops and relabels
    apply to the train split; the held-out split changes only if the view says it
    covers held-out images."""
    workers: int = 1
    """Local worker processes sharing each head's study (see ``pipelines.heads.shared``);
    each starts on another head and gets ``cores // workers`` threads."""
    pruner: str = "halving"
    """Trial pruning (``classifiers.tuning.PRUNERS``): ``halving``, folds as the budget of
    successive halving; ``median``, the earlier median rule."""
    since: float | None = None
    """Start of the run this worker belongs to (seconds since the epoch by the database's
    clock, ``classifiers.studies.storage_time``); refit claims older than it are an
    earlier run's. None: now."""


@dataclass
class HeadResult:
    """Outcome of one head."""

    head: str
    search: TuningResult
    threshold: float | None
    metrics: dict | None
    """Held-out evaluation (``classifiers.metrics.evaluation_report``); None without rows."""
    model_dir: Path
    refit_seconds: float


@dataclass
class FitHeadsResult:
    table_key: str
    objective: Objective
    eval_split: str | None
    heads: dict[str, HeadResult] = field(default_factory=dict)
    leaderboard: pd.DataFrame | None = None
    refit_elsewhere: dict[str, str] = field(default_factory=dict)
    """Heads refit by another worker sharing the study: head -> that worker."""


def parse_class_weight(value: str | dict | None) -> str | dict | None:
    """``None``/``"none"`` -> None, ``"balanced"``, or ``"0:3,1:1"`` -> ``{"0": 3.0, "1": 1.0}``."""
    if value is None or isinstance(value, dict):
        return value
    text = str(value).strip()
    if text.lower() in ("", "none"):
        return None
    if text.lower() == "balanced":
        return "balanced"
    weights = {}
    for part in text.split(","):
        label, sep, weight = part.rpartition(":")
        try:
            number = float(weight)
        except ValueError:
            number = -1.0
        if not sep or not label.strip() or number < 0:
            raise FeatureStoreError(f"class_weight must be 'balanced', 'none' or "
                                    f"label:weight pairs such as '0:3,1:1'; got {value!r}.")
        weights[label.strip()] = number
    return weights


def _class_weight_for(value, classes) -> str | dict | None:
    """Parsed class weights, checked against the table's labels before any trial runs."""
    weights = parse_class_weight(value)
    if isinstance(weights, dict):
        unknown = sorted(set(map(str, weights)) - {str(c) for c in classes})
        if unknown:
            raise FeatureStoreError(f"class_weight names labels {unknown} that the train split "
                                    f"lacks; labels: {', '.join(map(str, classes))}.")
    return weights


def _check_config(config: FitHeadsConfig) -> None:
    for head in config.heads:
        get_head_spec(head)  # raises with the list of known heads
    if not config.heads:
        raise FeatureStoreError(f"heads is empty; choose from {', '.join(list_heads())}.")
    if config.search not in SEARCHES:
        raise FeatureStoreError(
            f"search must be one of {', '.join(SEARCHES)}; got {config.search!r}.")
    if config.n_trials < 1:
        raise FeatureStoreError(f"n_trials must be >= 1; got {config.n_trials}.")
    if config.timeout is not None and not config.timeout > 0:  # NaN too
        raise FeatureStoreError(f"timeout must be seconds > 0, or None for no limit; "
                                f"got {config.timeout}.")
    if not 0 <= config.seed < 2**32:
        raise FeatureStoreError(f"seed must be between 0 and 2**32 - 1; got {config.seed}.")
    if config.pruner not in PRUNERS:
        raise FeatureStoreError(
            f"pruner must be one of {', '.join(PRUNERS)}; got {config.pruner!r}.")
    if config.workers < 1:
        raise FeatureStoreError(f"workers must be >= 1; got {config.workers}.")
    if config.eval_split not in (None, "val", "test"):
        raise FeatureStoreError(f"eval_split must be val or test; got {config.eval_split!r}.")


def run_fit_heads(config: FitHeadsConfig, echo: Callable[[str], None] = print) -> FitHeadsResult:
    """Search, threshold, refit, evaluate and save every head of ``config.heads``."""
    _check_config(config)
    if config.workers > 1:
        return run_workers(config, echo)
    store = Store(config.store, create=False)
    view = ViewStore(store).get(config.view) if config.view else None
    with store.open(config.table) as reader:
        X, y, ids, groups = _on_view(reader.to_numpy(split="train"), view, "train", echo)
        if not len(y):
            raise FeatureStoreError(f"Table {reader.key} has no train rows to tune on.")
        eval_split, held_out = _held_out(reader, config.eval_split, view, echo)
        lineage = reader.lineage
    classes = np.unique(y)
    if len(classes) < 2:
        raise FeatureStoreError(f"Table {lineage.key}: every train row has the label "
                                f"{str(classes[0])!r}; fit-heads needs at least two labels.")
    y_enc = np.searchsorted(classes, y)
    objective = make_objective(config.metric, classes, positive_class=config.positive_class,
                               min_recall=config.min_recall)
    class_weight = _class_weight_for(config.class_weight, classes)
    is_raw = ids["aug_id"] == 0
    folds = grouped_folds(y_enc, groups, is_raw, n_splits=config.cv, seed=config.seed)
    fold_of = np.full(len(y), -1)
    for k, fold in enumerate(folds):
        fold_of[fold.test] = fold_of[fold.views] = k
    fixed = {"class_weight": class_weight, "n_jobs": config.n_jobs,
             "random_state": config.seed}
    # Threads change speed, not results: they stay out of the study name.
    study_fixed = {k: v for k, v in fixed.items() if k != "n_jobs"}
    if view is not None:  # a changed view gets a new study, never a stale one's trials
        study_fixed.update(view=view.name, view_digest=view.digest)
    storage = config.storage or store.paths.optuna_url
    since = config.since or storage_time(storage)  # the database's clock: workers' may differ
    echo(f"Table {lineage.key}: {int(is_raw.sum())} raw + {int((~is_raw).sum())} augmented "
         f"train rows, {X.shape[1]} features, classes {', '.join(map(str, classes))}; "
         f"{config.cv}-fold grouped CV, objective {objective.label}.")
    result = FitHeadsResult(lineage.key, objective, eval_split)
    rows, searches = [], {}
    # Member refits stay fitted until the ensemble is built from them.
    kept: dict | None = {} if "ensemble" in config.heads else None
    searcher = _Searcher(config, storage, lineage.key, study_fixed, fixed, objective,
                         (X, y, groups, folds))
    for head in _ensemble_last(config.heads):
        started = time.perf_counter()
        search = searcher.search(head, searches)
        claimant = refit_claimant(storage, search, since)
        if claimant:
            result.refit_elsewhere[head] = claimant
            echo(f"\n== {head}: search of study {search.study_name} finished; "
                 f"worker {claimant} refits and saves it.")
            continue
        head_result = _finish_head(store, lineage, head, search, objective, classes,
                                   (X, y, groups, y_enc, ids, fold_of), held_out, config, view,
                                   kept)
        result.heads[head] = head_result
        rows.append(head_row(lineage, head_result, objective, eval_split, is_raw,
                             time.perf_counter() - started, config.view))
        echo(_head_summary(head_result, objective))
    for estimator in (kept or {}).values():
        estimator.clear()
    result.leaderboard = update_leaderboard(store, rows)
    return result


@dataclass
class _Searcher:
    """Each head's search: its Optuna study, or the ensemble's selection over the others'."""

    config: FitHeadsConfig
    storage: str
    table_key: str
    study_fixed: dict
    fixed: dict
    objective: Objective
    train: tuple
    """``(X, y, groups, folds)`` of the train split."""

    def search(self, head: str, searches: dict[str, TuningResult]) -> TuningResult:
        """Tune ``head`` (recorded in ``searches``), or select the ensemble over ``searches``."""
        config, (X, y, groups, folds) = self.config, self.train
        members = {"members": sorted(searches)} if head == "ensemble" else {}
        name = study_name(self.table_key, head, self.objective, cv=config.cv, seed=config.seed,
                          fixed_params={**self.study_fixed, **members})
        if head == "ensemble" and searches:
            search = select_ensemble(searches, y, folds, objective=self.objective,
                                     fixed_params=self.fixed)
            if config.search == "optuna":  # shared like the members': one worker refits it
                search.study_name = claim_study(self.storage, name)
            return search
        searches[head] = tune_head(
            head, X, y, groups, folds, objective=self.objective, n_trials=config.n_trials,
            timeout=config.timeout, seed=config.seed, fixed_params=self.fixed,
            storage=self.storage, search=config.search == "optuna", study_name=name,
            pruner=config.pruner)
        return searches[head]


def _ensemble_last(heads: Sequence[str]) -> list[str]:
    """``ensemble`` after the heads it selects from (the others of this run)."""
    return [h for h in heads if h != "ensemble"] + [h for h in heads if h == "ensemble"]


def _on_view(arrays: FeatureArrays, view: View | None, split: str, echo) -> FeatureArrays:
    """``arrays`` through ``view``: train always; held-out splits only if the view covers them."""
    if view is None or (split != "train" and not view.covers_heldout):
        return arrays
    arrays, effect = apply_view(arrays, view)
    echo(f"View {view.name!r} (revision {view.revision}) on {split}: {effect.describe()}.")
    return arrays


def _held_out(reader: TableReader, wanted: str | None, view: View | None = None, echo=print):
    """``(split name, (X, y, ids) of its raw rows)``, or ``(None, None)`` when it is empty."""
    for split in ([wanted] if wanted else ["test", "val"]):
        X, y, ids, _ = _on_view(reader.to_numpy(split=split, aug="raw"), view, split, echo)
        if len(y):
            return split, (X, y, ids)
    return None, None


def _finish_head(store, lineage, head, search: TuningResult, objective, classes, train,
                 held_out, config, view: View | None = None,
                 kept: dict | None = None) -> HeadResult:
    """Threshold from OOF predictions, refit on all train rows, evaluate, save.

    With ``kept``, a member's refit is kept there (not cleared) and the ensemble
    is built from the refits kept there.
    """
    X, y, groups, y_enc, ids, fold_of = train
    raw = ids["aug_id"] == 0
    threshold = None
    if objective.min_recall is not None:
        threshold = recall_floor_threshold(
            y_enc[raw] == objective.positive, search.oof[raw, objective.positive],
            objective.min_recall).threshold
    started = time.perf_counter()
    estimator = create_head(head, **search.params)
    if head == "ensemble" and search.params.get("weights") is not None:
        estimator.fit_members(kept or {}, X, y, groups=groups)
    else:
        estimator.fit(X, y, groups=groups)
    refit_seconds = time.perf_counter() - started
    metrics = held_proba = predicted = None
    if held_out is not None:
        X_eval, y_eval, _ = held_out
        unknown = sorted(set(y_eval) - set(classes))
        if unknown:
            raise FeatureStoreError(
                f"The held-out split has labels {unknown} that the train split lacks.")
        held_proba = estimator.predict_proba(X_eval)
        metrics = evaluation_report(np.searchsorted(classes, y_eval), held_proba, classes,
                                    threshold=threshold, positive=objective.positive)
        predicted = decide(held_proba, threshold, objective.positive)
    positive = None if objective.positive is None else str(classes[objective.positive])
    folder = save_model(store, estimator, head=head, lineage=lineage,
                        params=search.params, threshold=threshold, positive_class=positive,
                        meta={"objective": objective.label, "cv": config.cv,
                              "seed": config.seed, "cv_score": search.value,
                              "study_name": search.study_name, "metrics": metrics,
                              "fitted_at": utc_now(), "view_info": _view_info(view)},
                        view=config.view, extra_files=prediction_files(
                            train, search, classes, held_out, held_proba, predicted))
    if kept is not None and head != "ensemble":
        kept[head] = estimator
    else:
        estimator.clear()
    return HeadResult(head, search, threshold, metrics, folder, refit_seconds)


def _view_info(view: View | None) -> dict | None:
    if view is None:
        return None
    return {"name": view.name, "revision": view.revision, "digest": view.digest,
            "covers_heldout": view.covers_heldout, **view.counts()}


def _head_summary(result: HeadResult, objective: Objective) -> str:
    s = result.search
    resumed = f"; {s.n_resumed} from earlier runs of study {s.study_name}" if s.n_resumed else ""
    lines = [f"\n== {result.head}: cv {objective.label} {s.value:.4f} "
             f"({s.n_complete} complete, {s.n_pruned} pruned, {s.n_failed} failed trials"
             f"{resumed})", f"   params {s.params}"]
    lines += [f"   failed: {reason}" for reason in sorted(set(s.fail_reasons))[:3]]
    if result.threshold is not None:
        lines.append(f"   threshold {result.threshold:.4f} (recall floor "
                     f"{objective.min_recall:g} on out-of-fold predictions)")
    if result.metrics:
        m = result.metrics
        lines.append(f"   held-out ROC AUC {m['roc_auc']:.4f}\n{m['report_text']}"
                     f"   confusion matrix (rows true, columns predicted, {m['labels']}):")
        lines += [f"   {row}" for row in m["confusion_matrix"]]
    lines.append(f"   saved to {result.model_dir}")
    return "\n".join(lines)


class _CommandFailed(click.ClickException):
    """Bad input shown as ``Error: <message>``, exit status 2 like Click's own usage errors."""

    exit_code = 2


@click.command("fit-heads")
@click.option("--store", required=True, type=click.Path(path_type=Path), help="Store folder.")
@click.option("--table", required=True, help="Lineage query or key, e.g. densenet121/max.")
@click.option("--heads", default="logreg", show_default=True,
              help=f"Comma-separated heads: {', '.join(list_heads())}.")
@click.option("--search", type=click.Choice(SEARCHES), default="optuna", show_default=True)
@click.option("--n-trials", type=click.IntRange(min=1), default=20, show_default=True,
              help="Complete or pruned trials per head, counting those of earlier or "
                   "concurrent runs of the study (killed and failed trials do not count).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds of search per head [default: no limit].")
@click.option("--cv", type=click.IntRange(min=2), default=5, show_default=True)
@click.option("--metric", type=click.Choice(OBJECTIVES), default=None,
              help="Objective [default: recall_floor with --min-recall, else balanced_accuracy].")
@click.option("--positive-class", default=None, help="Label whose recall matters.")
@click.option("--min-recall", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Recall floor of the positive class; maximise specificity above it.")
@click.option("--class-weight", default="none", show_default=True,
              help="balanced, none, or label:weight pairs such as 0:3,1:1.")
@click.option("--storage", default=None,
              help="Optuna storage URL [default: sqlite:///STORE/optuna.sqlite].")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Local processes sharing each head's study (use a PostgreSQL --storage "
                   "to add workers on other machines).")
@click.option("--pruner", type=click.Choice(PRUNERS), default="halving", show_default=True,
              help="halving: successive halving with folds as the budget; median: the "
                   "earlier rule.")
@click.option("--n-jobs", type=click.IntRange(min=1), default=None,
              help="Threads per fit (xgboost, knn) [default: the library's].")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True)
@click.option("--eval-split", type=click.Choice(["test", "val"]), default=None,
              help="Held-out split [default: test if it has rows, else val].")
@click.option("--view", default=None,
              help="Train on this cleaned view (featurestore audit-labels --list-views).")
def command(store, table, heads, search, n_trials, timeout, cv, metric, positive_class,
            min_recall, class_weight, storage, workers, pruner, n_jobs, seed, eval_split, view):
    """Tune classifier heads on a feature table and compare them on a leaderboard."""
    config = FitHeadsConfig(
        store=store, table=table, heads=[h.strip() for h in heads.split(",") if h.strip()],
        search=search, n_trials=n_trials, timeout=timeout, cv=cv, metric=metric,
        positive_class=positive_class, min_recall=min_recall, class_weight=class_weight,
        storage=storage, workers=workers, pruner=pruner, n_jobs=n_jobs, seed=seed,
        eval_split=eval_split, view=view)
    try:
        result = run_fit_heads(config, echo=click.echo)
    except (FeatureStoreError, ClassifierError, ValueError) as err:
        raise _CommandFailed(str(err)) from err
    click.echo(f"\nLeaderboard ({Store(store, create=False).paths.leaderboard}):")
    click.echo(format_leaderboard(result.leaderboard))
