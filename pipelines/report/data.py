"""What the report shows, gathered from a store: the dataset, saved models and their predictions.

Nothing here draws or writes: :mod:`pipelines.report.figures` draws,
:mod:`pipelines.report.run` lays the page out. Every reader tolerates a store
that lacks a part (no manifest, no models, no Optuna storage): the report
then says so instead of failing.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, balanced_accuracy_score

from classifiers.metrics import decide, roc_auc
from featurestore import FeatureStoreError, Lineage, Store
from pipelines.extract.errors import read_errors
from pipelines.heads.model_folder import read_record
from pipelines.heads.models import (HELDOUT_FILE, OOF_FILE, PROBA_PREFIX, ModelRef, list_models,
                                    prediction_file)

#: Metrics computed per cross-validation fold from ``oof.parquet`` (mean ± std in the report).
FOLD_METRICS = ("accuracy", "balanced_accuracy", "roc_auc")


@dataclass
class DatasetFacts:
    """The scan's view of the dataset, plus the files extraction could not use."""

    counts: pd.DataFrame | None
    """Present images, index split, columns label (None without a manifest)."""
    rejected: pd.DataFrame
    """Entries the last scan skipped: columns path, reason."""
    conflicts: pd.DataFrame
    """Same bytes at several paths: columns image_id, kind, labels, splits, paths."""
    extract_errors: pd.DataFrame
    """Files that failed extraction: columns table_key, path, image_id, reason, seen_at."""
    note: str | None = None
    """Why a part is missing (e.g. no manifest), shown to the reader."""


def dataset_facts(store: Store) -> DatasetFacts:
    """Counts, rejected files, duplicates/leakage and extraction failures of ``store``."""
    errors = read_errors(store)
    empty_rejected = pd.DataFrame(columns=["path", "reason"])
    empty_conflicts = pd.DataFrame(columns=["image_id", "kind", "labels", "splits", "paths"])
    if not store.manifest_path.exists():
        return DatasetFacts(None, empty_rejected, empty_conflicts, errors,
                            note=f"No manifest in {store.root} (the tables were written "
                                 f"without `featurestore scan`).")
    with store.manifest() as manifest:
        return DatasetFacts(manifest.counts(), manifest.rejected()[["path", "reason"]],
                            manifest.conflicts(), errors)


class ImageLocator:
    """Finds the image file of an ``image_id``: the manifest first, then a table's ``path``.

    Table paths are manifest-relative when written by ``extract``; absolute
    ones (tables written by hand) are used as they are. Paths are resolved on
    demand, so a 20,000-image manifest costs one query, not 20,000 lookups.
    Use it as a context manager: it keeps the manifest open.
    """

    def __init__(self, store: Store):
        self._manifest = store.manifest() if store.manifest_path.exists() else None
        self._root: Path | None = None
        self._raw: dict[str, bytes] = {}
        if self._manifest is not None:
            self._root = self._manifest.root
            images = self._manifest.images()
            self._raw = dict(zip(images["image_id"], images["raw_path"]))
        self._table_paths: dict[str, str] = {}

    def add_table_paths(self, image_ids: np.ndarray, paths: np.ndarray) -> None:
        """Remember a table's ``path`` column for ids the manifest does not know."""
        for image_id, path in zip(image_ids.tolist(), paths.tolist()):
            if path and image_id not in self._raw:
                self._table_paths.setdefault(image_id, path)

    def path(self, image_id: str) -> Path | None:
        """Absolute path of the image, or None when no source names it."""
        if image_id in self._raw:
            try:
                return self._manifest.absolute_path(bytes(self._raw[image_id]))
            except FeatureStoreError:
                return None  # a path leaving the dataset root: no thumbnail rather than a crash
        path = self._table_paths.get(image_id)
        if not path:
            return None
        if os.path.isabs(path) or self._root is None:
            return Path(path)
        return self._root / path

    def close(self) -> None:
        if self._manifest is not None:
            self._manifest.close()

    def __enter__(self) -> ImageLocator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class ModelFacts:
    """One saved model: its ``model.json`` and its saved predictions."""

    ref: ModelRef
    meta: dict
    oof: pd.DataFrame | None
    """Out-of-fold probabilities of the raw train rows (image_id, label, fold, proba_*)."""
    heldout: pd.DataFrame | None
    """The refitted head on the held-out rows (image_id, label, predicted, proba_*)."""
    spread: dict[str, tuple[float, float, int]] = field(default_factory=dict)
    """Per-fold metric -> (mean, std, n_folds), from :func:`fold_spread`."""

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def slug(self) -> str:
        """File-name-safe form of :attr:`name`, for figure files and HTML ids."""
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.ref.name)

    @property
    def classes(self) -> list[str]:
        frame = self.heldout if self.heldout is not None else self.oof
        return [] if frame is None else proba_classes(frame)

    @property
    def threshold(self) -> float | None:
        return self.meta.get("threshold")

    @property
    def positive(self) -> int | None:
        """Index of the positive class in :attr:`classes` (binary default: the second)."""
        positive = self.meta.get("positive_class")
        classes = self.classes
        if positive is not None and str(positive) in classes:
            return classes.index(str(positive))
        return 1 if len(classes) == 2 else None

    def decisions(self, frame: pd.DataFrame) -> np.ndarray:
        """Predicted labels ``(n_rows,)`` of ``frame`` with the saved decision rule."""
        proba = frame[[PROBA_PREFIX + c for c in self.classes]].to_numpy()
        positive = self.positive if self.threshold is not None else None
        return np.asarray(self.classes)[decide(proba, self.threshold, positive)]


def proba_classes(frame: pd.DataFrame) -> list[str]:
    """Class labels of the ``proba_<label>`` columns, in column order."""
    return [c[len(PROBA_PREFIX):] for c in frame.columns if c.startswith(PROBA_PREFIX)]


def load_model_facts(store: Store) -> tuple[list[ModelFacts], list[str]]:
    """Every saved model with its predictions, and notes on models that could not be read."""
    models, notes = [], []
    for ref in list_models(store):
        try:
            meta = read_record(ref.path)
            oof = _read_optional(prediction_file(ref.path, OOF_FILE))
            heldout = _read_optional(prediction_file(ref.path, HELDOUT_FILE))
        except (FeatureStoreError, OSError, ValueError) as err:
            notes.append(f"{ref.name}: cannot read its files ({err}); left out.")
            continue
        facts = ModelFacts(ref, meta, oof, heldout)
        facts.spread = fold_spread(facts)
        models.append(facts)
    return models, notes


def _read_optional(path: Path | None) -> pd.DataFrame | None:
    return None if path is None else pd.read_parquet(path)


def fold_spread(model: ModelFacts) -> dict[str, tuple[float, float, int]]:
    """Mean, standard deviation and count over CV folds of :data:`FOLD_METRICS`.

    Computed from ``oof.parquet``: each row was scored by the fold that held
    it out, so grouping by ``fold`` gives one value per fold.
    """
    oof = model.oof
    if oof is None or "fold" not in oof or not len(oof):
        return {}
    index = {c: k for k, c in enumerate(model.classes)}
    y_enc = np.array([index.get(v, -1) for v in oof["label"].astype(str)], dtype=int)
    pred_enc = np.array([index[v] for v in model.decisions(oof)], dtype=int)
    proba = oof[[PROBA_PREFIX + c for c in model.classes]].to_numpy()
    folds = oof["fold"].to_numpy()
    values: dict[str, list[float]] = {name: [] for name in FOLD_METRICS}
    for fold in np.unique(folds):
        rows = folds == fold
        values["accuracy"].append(accuracy_score(y_enc[rows], pred_enc[rows]))
        values["balanced_accuracy"].append(balanced_accuracy_score(y_enc[rows], pred_enc[rows]))
        values["roc_auc"].append(roc_auc(y_enc[rows], proba[rows], model.positive))
    out = {}
    for name, series in values.items():
        finite = np.asarray([v for v in series if np.isfinite(v)])
        if finite.size:
            out[name] = (float(finite.mean()), float(finite.std(ddof=1)) if finite.size > 1
                         else 0.0, int(finite.size))
    return out


def misclassified(model: ModelFacts, limit: int) -> pd.DataFrame:
    """Held-out rows the model gets wrong, worst first (lowest probability of the true label).

    Columns: image_id, label, predicted, p_true, p_predicted; at most ``limit`` rows.
    """
    held = model.heldout
    columns = ["image_id", "label", "predicted", "p_true", "p_predicted"]
    if held is None or not len(held) or limit <= 0:
        return pd.DataFrame(columns=columns)
    wrong = held[held["label"].astype(str) != held["predicted"].astype(str)]
    proba = wrong[[PROBA_PREFIX + c for c in model.classes]].to_numpy()
    index = {c: k for k, c in enumerate(model.classes)}
    rows = np.arange(len(wrong))
    true_k = np.array([index.get(str(v), -1) for v in wrong["label"]], dtype=int)
    pred_k = np.array([index.get(str(v), -1) for v in wrong["predicted"]], dtype=int)
    frame = wrong[["image_id", "label", "predicted"]].assign(
        p_true=np.where(true_k >= 0, proba[rows, np.maximum(true_k, 0)], np.nan),
        p_predicted=np.where(pred_k >= 0, proba[rows, np.maximum(pred_k, 0)], np.nan))
    return frame.sort_values(["p_true", "image_id"], kind="stable").head(limit)[columns]


def error_ids(model: ModelFacts) -> set[str]:
    """Image ids the model misclassifies, out of fold (train) or held out (test/val)."""
    wrong: set[str] = set()
    if model.oof is not None and len(model.oof):
        bad = model.decisions(model.oof) != model.oof["label"].astype(str).to_numpy()
        wrong.update(model.oof.loc[bad, "image_id"].tolist())
    if model.heldout is not None and len(model.heldout):
        held = model.heldout
        wrong.update(held.loc[held["label"].astype(str) != held["predicted"].astype(str),
                              "image_id"].tolist())
    return wrong


def table_lineages(store: Store, models: list[ModelFacts]) -> dict[str, Lineage]:
    """Lineage by table key: the store's tables, plus those only models still remember."""
    lineages = {lin.key: lin for lin in store.lineages()}
    for model in models:
        # End-to-end models trained from pixels (train-cnn) have no table: lineage None.
        if model.ref.table_key not in lineages and model.meta.get("lineage"):
            lineages[model.ref.table_key] = Lineage.from_dict(model.meta["lineage"])
    return lineages
