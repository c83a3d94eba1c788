"""The prediction files saved with a head: ``oof.parquet`` (out-of-fold, for label audits)
and ``heldout.parquet`` (the refitted head on the held-out rows, for the report)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from featurestore._io import atomic_write
from pipelines.heads.models import HELDOUT_FILE, OOF_FILE, OOF_VIEWS_FILE, PROBA_PREFIX


def prediction_files(train, search, classes, held_out, held_proba,
                      predicted) -> dict:
    """Writers of oof.parquet and (with held-out rows) heldout.parquet, saved with the model."""
    _, y, _, _, ids, fold_of = train
    raw = ids["aug_id"] == 0
    files = {OOF_FILE: lambda path: _save_oof(path, ids[raw], y[raw], fold_of[raw],
                                              search.oof[raw], classes)}
    views = (fold_of >= 0) & ~np.asarray(raw)  # scored by their image's fold, for audit TTA
    if views.any():
        files[OOF_VIEWS_FILE] = lambda path: _save_predictions(
            path, ids[views], y[views], {"fold": fold_of[views], "aug_id": np.asarray(
                ids["aug_id"])[views]}, search.oof[views], classes)
    if held_proba is not None:
        files[HELDOUT_FILE] = lambda path: save_held_out(path, held_out, held_proba, classes,
                                                          predicted)
    return files


def _save_oof(path: Path, ids, labels, fold, proba, classes) -> None:
    """Out-of-fold probabilities of the raw train rows, for later label audits.

    Columns: ``image_id``, ``label``, ``fold`` (the fold that scored the row)
    and ``proba_<label>`` per class.
    """
    _save_predictions(path, ids, labels, {"fold": fold}, proba, classes)


def save_held_out(path: Path, held_out, proba, classes, predicted) -> None:
    """The refitted head's predictions on the held-out raw rows, as ``predict`` would make them.

    Columns: ``image_id``, ``label`` (given), ``predicted`` (decided with the
    saved threshold) and ``proba_<label>`` per class.
    """
    _, labels, ids = held_out
    _save_predictions(path, ids, labels,
                      {"predicted": np.asarray(classes)[predicted].astype(str)}, proba, classes)


def _save_predictions(path: Path, ids, labels, extra: dict, proba, classes) -> None:
    frame = pd.DataFrame({"image_id": ids["image_id"], "label": labels.astype(str), **extra})
    for k, label in enumerate(classes):
        frame[f"{PROBA_PREFIX}{label}"] = proba[:, k]
    atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))
