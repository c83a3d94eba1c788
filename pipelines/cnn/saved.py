"""End-to-end models (pixels in, probabilities out) saved and ranked beside the heads.

An end-to-end model lives where a head would, ``STORE/models/<key>/<head>/``,
written as a unit by :func:`~pipelines.heads.model_folder.write_model_folder`:
``model.keras`` (loaded with Keras' ``safe_mode`` only), ``heldout.parquet``
(the same columns as a head's, so the report's per-model sections, confusion
matrix and misclassified gallery read it unchanged) and ``model.json`` with
``"kind": "end_to_end"`` and the recipe. ``<key>`` is ``images-<size>`` for a
network trained from scratch, or the feature table's key for a fine-tuned
backbone + head (``<head>+ft``). Its leaderboard row carries the held-out
metrics, the objective on val in ``cv_score`` (val chose the epoch) and the
seconds per epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from classifiers.metrics import decide, evaluation_report, recall_floor_threshold, score
from featurestore import Store
from featurestore._io import utc_now
from pipelines.cnn.data import SplitImages
from pipelines.heads.predictions import save_held_out as _save_held_out
from pipelines.heads.leaderboard import update_leaderboard
from pipelines.heads.model_folder import write_model_folder
from pipelines.heads.models import HELDOUT_FILE, library_versions, model_dir

KERAS_FILE = "model.keras"
END_TO_END = "end_to_end"


@dataclass
class Evaluated:
    """A trained model's decision rule and held-out results."""

    threshold: float | None
    val_score: float
    metrics: dict
    proba: np.ndarray
    """``(n_test, n_classes)`` held-out probabilities."""
    predicted: np.ndarray


def predict_pixels(model, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """``(n, n_classes)`` float64 probabilities of uint8 pixels ``(n, h, w, 3)``."""
    return np.asarray(model.predict(pixels.astype(np.float32), batch_size=batch_size,
                                    verbose=0), dtype=np.float64)


def evaluate(model, classes, val: SplitImages, test: SplitImages, objective) -> Evaluated:
    """Threshold (recall floor) and objective on val, then the held-out report on test."""
    val_proba = predict_pixels(model, val.pixels)
    val_enc = val.encoded(classes)
    threshold = None
    if objective.min_recall is not None:
        threshold = recall_floor_threshold(val_enc == objective.positive,
                                           val_proba[:, objective.positive],
                                           objective.min_recall).threshold
    proba = predict_pixels(model, test.pixels)
    metrics = evaluation_report(test.encoded(classes), proba, classes, threshold=threshold,
                                positive=objective.positive)
    return Evaluated(threshold, score(objective, val_enc, val_proba), metrics, proba,
                     decide(proba, threshold, objective.positive))


def save_end_to_end(store: Store, model, *, key: str, head: str, classes, test: SplitImages,
                    result: Evaluated, objective, recipe: dict, lineage: dict | None,
                    timing: dict) -> str:
    """Write the model folder and its leaderboard row; returns the model's name."""
    positive = None if objective.positive is None else str(classes[objective.positive])

    def build(tmp):
        model.save(tmp / KERAS_FILE)
        _save_held_out(tmp / HELDOUT_FILE, (None, test.labels, {"image_id": test.image_ids}),
                       result.proba, classes, result.predicted)
        return {"kind": END_TO_END, "head": head, "view": None, "table_key": key,
                "lineage": lineage, "params": recipe.get("params", {}), "recipe": recipe,
                "classes": [str(c) for c in classes], "model_files": [KERAS_FILE],
                "threshold": result.threshold, "positive_class": positive,
                "objective": objective.label, "cv_score": result.val_score,
                "metrics": result.metrics, "timing": timing, "fitted_at": utc_now(),
                "library_versions": library_versions()}

    write_model_folder(model_dir(store, key, head), build)
    update_leaderboard(store, [_leaderboard_row(key, head, recipe, result, objective, timing)])
    return f"{key}/{head}"


def _leaderboard_row(key, head, recipe, result: Evaluated, objective, timing) -> dict:
    m = result.metrics
    return {
        "table_key": key, "head": head, "objective": objective.label, "view": "",
        "table": recipe["table"], "train_raw_rows": recipe["rows"]["train"],
        "train_aug_rows": 0, "cv_score": result.val_score, "eval_split": "test",
        "accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"],
        "roc_auc": m["roc_auc"], "f1_macro": m["f1_macro"], "recall": m.get("recall"),
        "specificity": m.get("specificity"), "threshold": result.threshold,
        "trials": None, "pruned": None, "failed": None, "sec_per_trial": None,
        "refit_sec": timing["train_sec"], "total_sec": timing["total_sec"],
        "sec_per_epoch": timing["sec_per_epoch"], "epochs": timing["epochs"],
        "params": str(recipe.get("params", {})), "updated_at": utc_now(),
    }


def load_end_to_end(folder, meta: dict):
    """The checked ``model.keras`` of an end-to-end model folder, loaded with ``safe_mode``."""
    import keras

    from pipelines.heads.model_folder import check_all_files

    check_all_files(folder, meta)
    return keras.saving.load_model(folder / KERAS_FILE, compile=False, safe_mode=True)
