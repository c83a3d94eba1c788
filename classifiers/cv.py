"""Grouped, stratified cross-validation that augmented views cannot leak through.

Rows come from a feature table: raw rows (``aug_id == 0``) and augmented views
(``aug_id > 0``) that share their source image's group. The folds are drawn on
the raw rows with scikit-learn's :class:`~sklearn.model_selection.StratifiedGroupKFold`;
then every augmented row joins the training side of each fold whose training
groups contain its image. So:

* a group (image) is on one side of a fold only, with all its views;
* a fold trains on augmented rows of its training images, and scores the
  augmented rows of its test images (``Fold.views``, test-time augmentation
  that the label audit averages), never the other way round;
* out-of-fold probabilities exist for every raw row, once; the objective is
  scored on raw rows only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold


class LeakageError(AssertionError):
    """A group sits on both sides of a fold, or an augmented row is tested."""


class Fold(NamedTuple):
    """Row positions of one fold: ``train`` (raw and augmented), ``test`` (raw only), and
    ``views``: augmented rows of the test images, scored by the fold's model, never trained."""

    train: np.ndarray
    test: np.ndarray
    views: np.ndarray = np.empty(0, dtype=np.int64)


def grouped_folds(y: np.ndarray, groups: np.ndarray, is_raw: np.ndarray, *, n_splits: int = 5,
                  seed: int = 0) -> list[Fold]:
    """Folds over all rows of a table split.

    ``y``, ``groups``, ``is_raw`` are ``(n_rows,)``: labels, source image ids
    and whether the row is a raw image. Stratified on the raw rows' labels.
    """
    y, groups, is_raw = np.asarray(y), np.asarray(groups), np.asarray(is_raw, dtype=bool)
    raw = np.flatnonzero(is_raw)
    n_groups = len(np.unique(groups[raw]))
    if not 2 <= n_splits <= n_groups:
        raise ValueError(f"cv must be between 2 and the number of raw training images "
                         f"({n_groups}); got {n_splits}.")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    augmented = np.flatnonzero(~is_raw)
    folds = []
    for train_raw, test_raw in splitter.split(raw, y[raw], groups[raw]):
        test_groups = groups[raw[test_raw]]
        # Views of a held-out image stay out of training; views of images with
        # no raw row anywhere are never scored, so they may train every fold.
        tested = np.isin(groups[augmented], test_groups)
        folds.append(Fold(np.sort(np.concatenate([raw[train_raw], augmented[~tested]])),
                          np.sort(raw[test_raw]), augmented[tested]))
    check_folds(folds, groups, is_raw)
    return folds


def check_folds(folds: list[Fold], groups: np.ndarray, is_raw: np.ndarray) -> None:
    """Raise :class:`LeakageError` if a group straddles a fold or a view is scored."""
    for k, fold in enumerate(folds):
        straddling = np.intersect1d(groups[fold.train], groups[fold.test])
        if straddling.size:
            raise LeakageError(f"Fold {k}: {straddling.size} image(s) on both sides, e.g. "
                               f"{straddling[0]!r}.")
        if not np.all(is_raw[fold.test]):
            raise LeakageError(f"Fold {k} tests augmented rows.")
        if np.intersect1d(groups[fold.train], groups[fold.views]).size:
            raise LeakageError(f"Fold {k} scores views of images it trains on.")


#: ``on_fold(k, y_test_enc, proba_test)`` is called after each fold (pruning hook).
FoldCallback = Callable[[int, np.ndarray, np.ndarray], None]
#: ``fit_predict(fold) -> (classes_, proba of scored_rows(fold))``: fits one fold elsewhere.
FitPredict = Callable[[Fold], tuple[np.ndarray, np.ndarray]]


def scored_rows(fold: Fold) -> np.ndarray:
    """Rows a fold's model predicts: its test rows, then the views of its test images."""
    return np.concatenate([fold.test, fold.views])


def cross_val_proba(make_estimator: Callable[[], object], X: np.ndarray, y: np.ndarray,
                    groups: np.ndarray, folds: list[Fold], classes: np.ndarray, *,
                    on_fold: FoldCallback | None = None,
                    after_fold: Callable[[], None] | None = None,
                    fit_predict: FitPredict | None = None) -> np.ndarray:
    """Out-of-fold probabilities ``(n_rows, n_classes)``; NaN on rows never scored.

    Each fold's model scores its test rows and the views of its test images
    (:func:`scored_rows`); ``on_fold`` sees the test rows only.

    ``y (n_rows,)`` holds the labels and ``classes`` their sorted unique
    values, which give the column order; a fold whose training part lacks a
    class gets probability 0 for it. ``groups`` go to the head's ``fit`` so
    its own inner splits stay grouped. ``after_fold`` releases per-fold
    resources (the Keras session). ``fit_predict(fold) -> (classes_, proba)``
    replaces the in-process fit (see :mod:`classifiers.workers`). ``on_fold``
    gets labels encoded as indices into ``classes``.
    """
    oof = np.full((len(y), len(classes)), np.nan)
    for k, fold in enumerate(folds):
        if fit_predict is None:
            estimator = make_estimator()
            estimator.fit(X[fold.train], y[fold.train], groups=groups[fold.train])
            fitted, fold_proba = estimator.classes_, estimator.predict_proba(X[scored_rows(fold)])
            del estimator
            if after_fold is not None:
                after_fold()
        else:
            fitted, fold_proba = fit_predict(fold)
        proba = np.zeros((len(fold_proba), len(classes)))
        proba[:, np.searchsorted(classes, fitted)] = fold_proba
        oof[scored_rows(fold)] = proba
        if on_fold is not None:
            on_fold(k, np.searchsorted(classes, y[fold.test]), proba[:len(fold.test)])
    return oof
