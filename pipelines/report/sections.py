"""The report's sections as template contexts: tables as :class:`Grid`, figures as file paths.

Each ``*_section`` function gathers (:mod:`pipelines.report.data`), draws
(:mod:`pipelines.report.figures`) and returns plain dicts and lists that
``templates/report.html`` lays out.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_fscore_support

from classifiers.metrics import roc_auc
from featurestore import Store
from pipelines.report import figures
from pipelines.html import thumbnail
from pipelines.report.compare import (COMPARISON_COLUMNS, COMPARISONS, comparison_groups,
                                      comparison_rows)
from pipelines.report.data import (FOLD_METRICS, PROBA_PREFIX, DatasetFacts, ImageLocator,
                                   ModelFacts, misclassified)

#: Rows listed at most in a problem table (rejected files, duplicates, failures).
MAX_LISTED = 50


@dataclass
class Grid:
    """A table for the template: header and rows of cells (str cells align left)."""

    columns: list[str]
    rows: list[list]

    @classmethod
    def of(cls, frame: pd.DataFrame, *, index: bool = False, limit: int | None = None) -> Grid:
        shown = frame.reset_index() if index else frame
        if limit is not None:
            shown = shown.head(limit)
        rows = [[_cell(v) for v in row] for row in shown.itertuples(index=False, name=None)]
        return cls([str(c) for c in shown.columns], rows)


def _cell(value):
    if isinstance(value, (list, tuple, np.ndarray)):
        return ", ".join(map(str, value))
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def dataset_section(facts: DatasetFacts, tables: list, out_dir: Path) -> dict:
    """Counts per split and class, rejected files, duplicates/leakage, extraction failures."""
    section: dict = {"note": facts.note, "tables": Grid(
        ["table", "recipe", "rows", "dimension", "formats", "size MB"],
        [[t.key, _recipe(t.lineage), t.rows, t.dimension, ", ".join(t.formats),
          t.size_bytes / 1e6] for t in tables])}
    if facts.counts is not None and facts.counts.size:
        counts = facts.counts.copy()
        counts["total"] = counts.sum(axis=1)
        section["counts"] = Grid.of(counts, index=True)
        section["counts_figure"] = figures.class_counts(facts.counts, out_dir)
    for name, frame, by in (("rejected", facts.rejected, "reason"),
                            ("conflicts", facts.conflicts, "kind"),
                            ("extract_errors", facts.extract_errors, "reason")):
        section[name] = {"total": len(frame), "listed": Grid.of(frame, limit=MAX_LISTED),
                         "by": Grid.of(frame.groupby(by).size().rename("files")
                                       .reset_index()) if len(frame) else None}
    return section


def _recipe(lineage) -> str:
    """The table's name (as the leaderboard shows it), its weights and augmented views."""
    views = (lineage.augmentation or {}).get("views")
    return f"{lineage.name} ({lineage.weights}" + \
        (f", {views} augmented views)" if views else ")")


def leaderboard_grid(board: pd.DataFrame) -> Grid | None:
    """The leaderboard's shown columns plus each per-fold metric as mean ± std."""
    if board.empty:
        return None
    columns = ["table", "head", "view", "objective", "cv_score", "eval_split", "accuracy",
               "balanced_accuracy", "roc_auc", "f1_macro", "recall", "specificity",
               "threshold", "trials", "refit_sec", "sec_per_epoch"]
    shown = board[[c for c in columns if c in board]].copy()
    for name in FOLD_METRICS:
        values = board[f"cv_{name}"] if f"cv_{name}" in board else [None] * len(board)
        shown[f"CV {name} (folds)"] = [_spread(v) for v in values]
    if "sec_per_epoch" in board:  # end-to-end models (train-cnn, fine-tune) are ranked too
        shown["x fastest head fit"] = _cost_ratio(board)
    return Grid.of(shown)


def _cost_ratio(board: pd.DataFrame) -> pd.Series:
    """Seconds per epoch (end to end) or per fit (heads) over the fastest head fit."""
    per_epoch = pd.to_numeric(board["sec_per_epoch"], errors="coerce")
    fits = pd.to_numeric(board["refit_sec"], errors="coerce")
    fastest = fits[per_epoch.isna()].min()
    return per_epoch.fillna(fits) / fastest if fastest and fastest > 0 else per_epoch * np.nan


def _spread(value) -> str:
    return "-" if not value else f"{value[0]:.3f} ± {value[1]:.3f}"


def comparison_sections(board: pd.DataFrame, out_dir: Path) -> list[dict]:
    """One entry per :data:`COMPARISONS` kind: groups side by side and a bar chart."""
    sections = []
    for comparison in COMPARISONS:
        groups = comparison_groups(board, comparison)
        entry = {"name": comparison.name, "title": comparison.title, "vary": comparison.vary,
                 "groups": [{"label": label, "grid": Grid(list(COMPARISON_COLUMNS),
                                                          comparison_rows(rows, comparison.vary))}
                            for label, rows in groups], "figure": None}
        bars = [(label, [(str(r[comparison.vary]), r.get("cv_balanced_accuracy"))
                         for r in rows.to_dict("records")]) for label, rows in groups]
        if any(spread for _, items in bars for _, spread in items):
            entry["figure"] = figures.comparison_points(
                bars, comparison.vary, "balanced_accuracy", out_dir,
                f"compare-{comparison.name}", comparison.title)
        sections.append(entry)
    return sections


def model_section(model: ModelFacts, out_dir: Path, studies: StudyReader,
                  locator: ImageLocator, gallery_size: int, heatmaps=None) -> dict:
    """Metrics, confusion matrix, curves, Optuna study and the misclassified gallery."""
    meta = model.meta
    rule = f"threshold {model.threshold:.3f} on P({model.classes[model.positive]})" \
        if model.threshold is not None and model.positive is not None else "argmax"
    section = {"name": model.name, "slug": model.slug, "head": model.ref.head,
               "view": model.ref.view or "", "objective": meta.get("objective"),
               "cv_score": meta.get("cv_score"), "rule": rule, "params": meta.get("params"),
               "spread": {k: _spread(v) for k, v in model.spread.items()}}
    held = model.heldout
    if held is None or not len(held):
        section["note"] = "No held-out predictions (heldout.parquet): the table had no " \
                          "test or val rows when the head was fitted."
    else:
        section.update(_held_out_figures(model, held, out_dir, rule))
    section["optuna"] = studies.section(model, out_dir)
    section["gallery"] = _gallery(model, out_dir, locator, gallery_size)
    if heatmaps is not None:  # pipelines.explain.gallery.GalleryHeatmaps: beside each thumbnail
        items = section["gallery"]["items"]
        found, section["gallery"]["heatmap_note"] = heatmaps(
            model.name, [(g["image_id"], Path(g["path"])) for g in items if g["src"]])
        for g in items:
            g["heatmap"] = found.get(g["image_id"])
    return section


def _held_out_figures(model: ModelFacts, held: pd.DataFrame, out_dir: Path, rule: str) -> dict:
    classes = model.classes
    y_true = held["label"].astype(str).to_numpy()
    y_pred = held["predicted"].astype(str).to_numpy()
    proba = held[[PROBA_PREFIX + c for c in classes]].to_numpy()
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=classes, zero_division=0)
    metrics = pd.DataFrame({"class": classes, "precision": precision, "recall": recall,
                            "F1": f1, "support": support})
    index = {c: k for k, c in enumerate(classes)}
    y_enc = np.array([index.get(v, -1) for v in y_true])
    summary = Grid(["rows", "accuracy", "balanced accuracy", "F1 macro", "ROC AUC"], [[
        len(held), float(np.mean(y_true == y_pred)), float(np.mean(recall[support > 0])),
        float(np.mean(f1)), roc_auc(y_enc, proba, model.positive)]])
    title = f"{model.name} (held-out, {len(held)} rows)"
    return {
        "metrics": Grid.of(metrics), "summary": summary,
        "confusion": figures.confusion(classes, y_true, y_pred, out_dir,
                                       f"confusion-{model.slug}", title),
        "curves": figures.curves(y_true, proba, classes, y_pred, out_dir,
                                 f"curves-{model.slug}", title, model.positive, rule)}


def _gallery(model: ModelFacts, out_dir: Path, locator: ImageLocator, size: int) -> dict:
    wrong = misclassified(model, size)
    total = 0 if model.heldout is None else \
        int((model.heldout["label"].astype(str) != model.heldout["predicted"].astype(str)).sum())
    items = []
    for row in wrong.itertuples(index=False):
        path = locator.path(row.image_id)
        items.append({"src": thumbnail(path, out_dir, row.image_id[:16]) if path else None,
                      "image_id": row.image_id, "label": row.label, "predicted": row.predicted,
                      "p_true": row.p_true, "p_predicted": row.p_predicted,
                      "path": str(path) if path else "unknown path"})
    return {"items": items, "total": total}


class StudyReader:
    """Reads Optuna studies from one storage (opened once) and draws their history."""

    def __init__(self, url: str | None):
        self.url = url
        self._storage = None

    def _open(self):
        import optuna

        if self._storage is None:
            self._storage = optuna.storages.get_storage(self.url)
        return self._storage

    def section(self, model: ModelFacts, out_dir: Path) -> dict:
        """``{"figure": path, "trials": n}`` or ``{"note": why there is no figure}``."""
        name = model.meta.get("study_name")
        if not name:
            return {"note": "Fitted with search 'none': the head's default parameters were "
                            "cross-validated once, so there is no Optuna study."}
        if self.url is None:
            return {"note": f"Study {name} not shown: no Optuna storage found (pass --storage)."}
        import optuna

        with _quiet_optuna():
            try:
                study = optuna.load_study(study_name=name, storage=self._open())
            except KeyError:
                return {"note": f"Study {name} is not in storage {self.url}."}
            except Exception as err:  # a broken storage costs this figure, not the report
                return {"note": f"Cannot read study {name} from {self.url}: {err}"}
            trials = study.get_trials(deepcopy=False,
                                      states=(optuna.trial.TrialState.COMPLETE,))
            if not trials:
                return {"note": f"Study {name} has no complete trial."}
            importances = _importances(study, trials)
        numbers = np.array([t.number for t in trials])
        values = np.array([t.value for t in trials], dtype=float)
        return {"figure": figures.optuna_study(numbers, values, importances, out_dir,
                                               f"optuna-{model.slug}", name),
                "trials": len(study.trials), "complete": len(trials), "study": name}


def _importances(study, trials) -> dict[str, float] | None:
    """Optuna's parameter importances; None when undefined (one trial, nothing searched)."""
    import optuna

    if len(trials) < 2 or not any(t.params for t in trials):
        return None
    try:
        with warnings.catch_warnings():
            # Near-equal trial values make importances flat; the chart shows that already.
            warnings.simplefilter("ignore", UserWarning)
            return optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError):
        return None


@contextlib.contextmanager
def _quiet_optuna():
    logger = logging.getLogger("optuna")
    previous = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(previous)


def default_storage(store: Store, url: str | None) -> str | None:
    """``url``, else the fit-heads default ``sqlite:///STORE/optuna.sqlite`` when it exists."""
    if url:
        return url
    return store.paths.optuna_url if store.paths.optuna.exists() else None
