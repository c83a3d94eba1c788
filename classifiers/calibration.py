"""Out-of-fold recalibration of probabilities that are already out of fold.

A tuned head is often over-confident (probabilities of 1e-4 for a class it
merely thinks unlikely), and averaging heads lets the most confident one speak
loudest. The label audit therefore recalibrates each head's out-of-fold
probabilities before it averages them. The calibrator of fold ``k`` is fitted
on the rows of the other folds only (cross-fitting), so no row calibrates its
own probability and the result is still out of fold.

The calibrators are scikit-learn's (:class:`~sklearn.calibration.CalibratedClassifierCV`,
``temperature``: one softmax temperature for every class, or ``isotonic``: one
monotone map per class, renormalised); they calibrate a frozen estimator, so the
probabilities are wrapped in :class:`_GivenProba`, which predicts its input.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import StratifiedKFold

from classifiers.errors import ClassifierError
from classifiers.label_issues import CALIBRATIONS


class _GivenProba(ClassifierMixin, BaseEstimator):
    """A "classifier" whose input rows are its predicted probabilities ``(n, n_classes)``."""

    def __init__(self, n_classes: int = 2):
        self.n_classes = n_classes

    def fit(self, X=None, y=None):
        self.classes_ = np.arange(self.n_classes)
        return self

    def predict_proba(self, X):
        return np.asarray(X, dtype=np.float64)

    def predict(self, X):
        return np.argmax(X, axis=1)


def calibrate_out_of_fold(labels: np.ndarray, proba: np.ndarray, fold: np.ndarray | None = None,
                          *, method: str = "temperature", seed: int = 0) -> np.ndarray:
    """Cross-fitted calibration of ``proba (n_rows, n_classes)``; rows still sum to 1.

    ``labels (n_rows,)`` are class indices into the columns; ``fold (n_rows,)``
    the fold that scored each row (default: five stratified folds drawn here).
    Returns ``proba`` unchanged for ``method="none"``, or when a fold's other
    rows lack a class (too few rows to calibrate on).
    """
    if method not in CALIBRATIONS:
        raise ClassifierError(f"Unknown calibration {method!r}. Available: "
                              f"{', '.join(CALIBRATIONS)}.")
    labels, proba = np.asarray(labels, dtype=np.int64), np.asarray(proba, dtype=np.float64)
    n_classes = proba.shape[1]
    if method == "none" or np.bincount(labels, minlength=n_classes).min() < 2:
        return proba
    if fold is None:
        splits = min(5, int(np.bincount(labels, minlength=n_classes).min()))
        fold = np.empty(len(labels), dtype=np.int64)
        for k, (_, rows) in enumerate(StratifiedKFold(splits, shuffle=True, random_state=seed)
                                      .split(proba, labels)):
            fold[rows] = k
    calibrated = proba.copy()
    base = FrozenEstimator(_GivenProba(n_classes).fit())
    for k in np.unique(fold):
        rows, others = fold == k, fold != k
        if len(np.unique(labels[others])) < n_classes:
            return proba
        model = CalibratedClassifierCV(base, method=method).fit(proba[others], labels[others])
        calibrated[rows] = model.predict_proba(proba[rows])
    return calibrated
