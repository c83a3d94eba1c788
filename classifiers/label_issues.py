"""Rank likely label errors from out-of-sample probabilities.

Two methods:

``cleanlab``
    Confident learning (Northcutt et al., 2021) through cleanlab's
    ``find_label_issues``: it estimates how often each class is mistaken for
    each other class and flags that many of the least confident rows per class
    pair. We never re-implement it.
``threshold``
    The users' own rule: flag a row whose probability of its given label is
    below ``below``, or whose probability of some other class is above ``above``.

Either way a row's ``score`` is cleanlab's label quality score
(``self_confidence``: the probability of the given label; lower is more
suspect), and flagged rows are ranked by it, worst first. The suggested label is
the most probable *other* class: what the row would be if its label is wrong.

Pure arrays in, arrays out: nothing here reads files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from classifiers.errors import ClassifierError

METHODS = ("cleanlab", "threshold")
#: Out-of-fold recalibrations (:mod:`classifiers.calibration`), named here so that the CLI
#: lists them without importing scikit-learn's calibration module.
CALIBRATIONS = ("temperature", "isotonic", "none")
#: Neighbours of the feature-space vote (``neighbour_vote``): the knn head's default.
VOTE_NEIGHBOURS = 15


@dataclass
class LabelIssues:
    """Per-row results, ``(n_rows,)`` each."""

    score: np.ndarray
    """Label quality in [0, 1]; lower means more likely mislabelled."""
    flagged: np.ndarray
    """True where the method calls the label an issue."""
    suggested: np.ndarray
    """Index of the most probable class other than the given one."""
    order: np.ndarray
    """Row positions, flagged rows first, each part by ascending score (worst first)."""


def rank_label_issues(labels: np.ndarray, pred_probs: np.ndarray, *, method: str = "cleanlab",
                      below: float | None = 0.5, above: float | None = None) -> LabelIssues:
    """Score, flag and rank rows.

    Parameters
    ----------
    labels : (n_rows,) int class indices into the columns of ``pred_probs``.
    pred_probs : (n_rows, n_classes) out-of-sample probabilities (rows sum to 1).
    method : ``cleanlab`` or ``threshold``.
    below, above : thresholds of the ``threshold`` method (None: that rule is off).
    """
    labels = np.asarray(labels, dtype=np.int64)
    pred_probs = np.asarray(pred_probs, dtype=np.float64)
    if method not in METHODS:
        raise ClassifierError(f"Unknown audit method {method!r}. Available: "
                              f"{', '.join(METHODS)}.")
    if pred_probs.ndim != 2 or len(pred_probs) != len(labels):
        raise ClassifierError(f"pred_probs must be (n_rows, n_classes) with n_rows = "
                              f"{len(labels)}; got shape {pred_probs.shape}.")
    from cleanlab.rank import get_label_quality_scores  # heavy import, only needed here

    score = get_label_quality_scores(labels, pred_probs, method="self_confidence")
    if method == "cleanlab":
        flagged = _confident_learning(labels, pred_probs)
    else:
        flagged = _threshold_rule(labels, pred_probs, below, above)
    others = pred_probs.copy()
    others[np.arange(len(labels)), labels] = -np.inf
    suggested = others.argmax(axis=1) if len(labels) else np.zeros(0, np.int64)
    # lexsort: last key first; flagged rows first, then worst score, then row order.
    order = np.lexsort((np.arange(len(labels)), score, ~flagged))
    return LabelIssues(score, flagged, suggested, order)


def _confident_learning(labels: np.ndarray, pred_probs: np.ndarray) -> np.ndarray:
    from cleanlab.filter import find_label_issues

    if len(np.unique(labels)) < 2:
        raise ClassifierError("Confident learning needs at least two classes among the "
                              "given labels.")
    # n_jobs=1: cleanlab's default forks one process per core, which costs more than
    # it saves at audit sizes (thousands of rows) and competes with other jobs.
    return find_label_issues(labels, pred_probs, filter_by="prune_by_noise_rate", n_jobs=1)


def _threshold_rule(labels, pred_probs, below, above) -> np.ndarray:
    if below is None and above is None:
        raise ClassifierError("The threshold method needs below and/or above; got neither.")
    for name, value in (("below", below), ("above", above)):
        if value is not None and not 0 <= value <= 1:
            raise ClassifierError(f"{name} must be a probability in [0, 1]; got {value}.")
    given = pred_probs[np.arange(len(labels)), labels]
    flagged = np.zeros(len(labels), dtype=bool)
    if below is not None:
        flagged |= given < below
    if above is not None:
        others = pred_probs.copy()
        others[np.arange(len(labels)), labels] = -np.inf
        flagged |= others.max(axis=1, initial=-np.inf) > above
    return flagged


def neighbour_vote(X: np.ndarray, labels: np.ndarray, fold: np.ndarray, n_classes: int, *,
                   n_neighbors: int = VOTE_NEIGHBOURS) -> np.ndarray:
    """Out-of-fold class votes of each row's nearest neighbours, ``(n_rows, n_classes)``.

    ``X (n_rows, n_features)`` are the rows' features, ``labels (n_rows,)`` class
    indices and ``fold (n_rows,)`` the fold that scored each row: the rows of
    fold ``k`` are voted on by the other folds' rows only, so a mislabelled row
    never votes for its own label. It is the ``knn`` head, cross-validated on
    the folds that the audited heads used.
    """
    from classifiers.registry import create_head

    labels = np.asarray(labels, dtype=np.int64)
    votes = np.zeros((len(labels), n_classes))
    for k in np.unique(fold):
        rows, others = fold == k, fold != k
        if len(np.unique(labels[others])) < 2:
            raise ClassifierError(f"Fold {k}: the other folds hold fewer than two classes; "
                                  f"too few rows for a neighbour vote.")
        knn = create_head("knn", n_neighbors=n_neighbors).fit(X[others], labels[others])
        votes[np.ix_(rows, knn.classes_)] = knn.predict_proba(X[rows])
    return votes
