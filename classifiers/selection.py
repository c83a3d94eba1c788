"""The ``ensemble`` head of a fit-heads run: greedy selection over the heads it tuned.

Kept out of :mod:`classifiers.tuning` (no Optuna study is involved) and out of
:mod:`classifiers.heads.ensemble` (which the registry imports, and which must
stay free of the tuning machinery).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from classifiers.cv import Fold
from classifiers.metrics import Objective, score
from classifiers.tuning import TuningResult, head_fixed_params


def select_ensemble(members: Mapping[str, TuningResult], y: np.ndarray, folds: list[Fold], *,
                    objective: Objective, fixed_params: Mapping[str, Any] | None = None,
                    n_iter: int = 25) -> TuningResult:
    """The ``ensemble`` head over tuned ``members``: weights by greedy selection on their OOF.

    No new trial is run: the members' out-of-fold probabilities (same folds)
    are the ensemble's candidates, and its out-of-fold probabilities are their
    weighted mean, scored like any trial. ``y (n_rows,)`` are the labels.
    """
    from classifiers.heads.ensemble import greedy_selection

    started = time.perf_counter()
    names = list(members)
    rows = np.concatenate([f.test for f in folds])
    classes = np.unique(y)
    y_enc = np.searchsorted(classes, y)
    weights = greedy_selection([members[n].oof[rows] for n in names], y_enc[rows], n_iter)
    oof = sum(w * members[n].oof for w, n in zip(weights, names))
    params = {**head_fixed_params("ensemble", fixed_params or {}), "n_iter": n_iter,
              "member_params": {n: dict(members[n].params) for n in names},
              "weights": [float(w) for w in weights]}
    value = score(objective, y_enc[rows], oof[rows])
    return TuningResult("ensemble", params, float(value), oof, n_complete=1,
                        trial_seconds=[time.perf_counter() - started])
