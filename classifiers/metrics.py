"""Objectives, the recall-floor threshold and the held-out evaluation report.

Labels here are encoded ``0..n_classes-1`` and probabilities are
``(n_samples, n_classes)``. Every objective is maximised.

The recall floor: among all thresholds on the positive class's probability,
keep those whose recall of the positive class is at least ``min_recall`` and
take the one with the highest specificity (the fewest false alarms). Users set
it to not miss pneumonia, or a loaded container declared empty. The threshold
is chosen on out-of-fold predictions, never on the data it is evaluated on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, classification_report,
                             confusion_matrix, f1_score, roc_auc_score, roc_curve)

#: Objective names the search and the CLI accept.
OBJECTIVES = ("accuracy", "balanced_accuracy", "roc_auc", "f1", "recall_floor")


@dataclass(frozen=True)
class Objective:
    """What a search maximises, resolved against the classes of a table."""

    name: str
    """One of :data:`OBJECTIVES`."""
    positive: int | None = None
    """Encoded index of the positive class (binary default: the second class)."""
    min_recall: float | None = None
    """Recall floor of the positive class; chooses the decision threshold when set."""

    @property
    def label(self) -> str:
        """Short name for study names and the leaderboard: ``recall_floor@0.95``."""
        return f"{self.name}@{self.min_recall:g}" if self.name == "recall_floor" else self.name


def make_objective(name: str | None, classes, *, positive_class=None,
                   min_recall: float | None = None) -> Objective:
    """Check the objective arguments against the table's ``classes`` (sorted labels).

    ``name=None`` means ``recall_floor`` when ``min_recall`` is given, else
    ``balanced_accuracy``.
    """
    classes = [str(c) for c in classes]
    name = name or ("recall_floor" if min_recall is not None else "balanced_accuracy")
    if name not in OBJECTIVES:
        raise ValueError(f"Unknown metric {name!r}. Allowed: {', '.join(OBJECTIVES)}.")
    if min_recall is not None and not 0.0 < float(min_recall) <= 1.0:
        raise ValueError(f"min_recall must be in (0, 1]; got {min_recall!r}.")
    if name == "recall_floor" and min_recall is None:
        raise ValueError("metric 'recall_floor' needs min_recall (e.g. --min-recall 0.95).")
    if positive_class is not None:
        if str(positive_class) not in classes:
            raise ValueError(f"positive_class {positive_class!r} is not a label of the table; "
                             f"labels: {', '.join(classes)}.")
        positive = classes.index(str(positive_class))
    elif len(classes) == 2:
        positive = 1
    elif min_recall is not None:
        raise ValueError(f"min_recall needs positive_class with {len(classes)} classes; "
                         f"labels: {', '.join(classes)}.")
    else:
        positive = None
    return Objective(name, positive, None if min_recall is None else float(min_recall))


@dataclass(frozen=True)
class ThresholdChoice:
    """A decision threshold on the positive class's probability and what it gave."""

    threshold: float
    """Predict the positive class when its probability is ``>= threshold``."""
    recall: float
    specificity: float


def recall_floor_threshold(is_positive: np.ndarray, score: np.ndarray,
                           min_recall: float) -> ThresholdChoice:
    """The threshold with the best specificity among those with recall ``>= min_recall``.

    ``is_positive`` and ``score`` are ``(n_samples,)``. Ties in specificity go
    to the higher recall. The lowest score always reaches recall 1, so a
    threshold always exists.
    """
    is_positive = np.asarray(is_positive, dtype=bool)
    if is_positive.all() or not is_positive.any():
        raise ValueError("The recall floor needs both positive and negative rows; "
                         f"got {int(is_positive.sum())} positive of {len(is_positive)}.")
    fpr, tpr, thresholds = roc_curve(is_positive, score, drop_intermediate=False)
    feasible = np.flatnonzero(tpr >= min_recall - 1e-12)
    # Lowest false-positive rate first, then highest recall.
    best = feasible[np.lexsort((-tpr[feasible], fpr[feasible]))[0]]
    return ThresholdChoice(float(thresholds[best]), float(tpr[best]), float(1.0 - fpr[best]))


def decide(proba: np.ndarray, threshold: float | None = None,
           positive: int | None = None) -> np.ndarray:
    """Encoded predictions ``(n_samples,)``: argmax, or the positive class at ``threshold``.

    With a threshold, a row whose positive probability is below it gets the
    most probable of the other classes (for two classes: the negative one).
    """
    if threshold is None or positive is None:
        return np.argmax(proba, axis=1)
    others = proba.copy()
    others[:, positive] = -np.inf
    return np.where(proba[:, positive] >= threshold, positive, np.argmax(others, axis=1))


def roc_auc(y_enc: np.ndarray, proba: np.ndarray, positive: int | None = None) -> float:
    """Binary AUC of the positive class, or macro one-vs-rest AUC; NaN if undefined."""
    n_classes = proba.shape[1]
    present = np.unique(y_enc)
    try:
        if n_classes == 2 or (positive is not None and len(present) == 2 and n_classes == 2):
            pos = 1 if positive is None else positive
            return float(roc_auc_score(y_enc == pos, proba[:, pos]))
        if len(present) < n_classes:
            return float("nan")
        return float(roc_auc_score(y_enc, proba, multi_class="ovr", labels=range(n_classes)))
    except ValueError:
        return float("nan")


def score(objective: Objective, y_enc: np.ndarray, proba: np.ndarray) -> float:
    """Value of ``objective`` for encoded labels ``(n,)`` and probabilities ``(n, n_classes)``."""
    if objective.name == "roc_auc":
        return roc_auc(y_enc, proba, objective.positive)
    if objective.name == "recall_floor":
        return recall_floor_threshold(y_enc == objective.positive, proba[:, objective.positive],
                                      objective.min_recall).specificity
    pred = decide(proba)
    if objective.name == "accuracy":
        return float(accuracy_score(y_enc, pred))
    if objective.name == "balanced_accuracy":
        return float(balanced_accuracy_score(y_enc, pred))
    if proba.shape[1] == 2:
        return float(f1_score(y_enc, pred, pos_label=objective.positive, zero_division=0))
    return float(f1_score(y_enc, pred, average="macro", labels=range(proba.shape[1]),
                          zero_division=0))


def evaluation_report(y_enc: np.ndarray, proba: np.ndarray, classes, *,
                      threshold: float | None = None, positive: int | None = None) -> dict:
    """Held-out metrics as a JSON-ready dict.

    Keys: ``accuracy``, ``balanced_accuracy``, ``f1_macro``, ``roc_auc``,
    ``report`` (scikit-learn's classification report: per-class precision,
    recall, F1, support), ``confusion_matrix`` (rows true, columns predicted,
    in ``labels`` order), ``labels``, ``threshold`` and, with a positive class,
    ``recall``/``specificity`` of that class.
    """
    labels = [str(c) for c in classes]
    pred = decide(proba, threshold, positive)
    k = len(labels)
    out = {
        "n_samples": int(len(y_enc)),
        "accuracy": float(accuracy_score(y_enc, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_enc, pred)),
        "f1_macro": float(f1_score(y_enc, pred, average="macro", labels=range(k),
                                   zero_division=0)),
        "roc_auc": roc_auc(y_enc, proba, positive),
        "report": classification_report(y_enc, pred, labels=range(k), target_names=labels,
                                         output_dict=True, zero_division=0),
        "report_text": classification_report(y_enc, pred, labels=range(k), target_names=labels,
                                             zero_division=0, digits=3),
        "confusion_matrix": confusion_matrix(y_enc, pred, labels=range(k)).tolist(),
        "labels": labels,
        "threshold": threshold,
    }
    if positive is not None:
        pos = y_enc == positive
        out["positive_class"] = labels[positive]
        out["recall"] = float((pred[pos] == positive).mean()) if pos.any() else float("nan")
        out["specificity"] = float((pred[~pos] != positive).mean()) if (~pos).any() \
            else float("nan")
    return out
