"""Fit folds in a recycled child process, for heads whose library leaks per model.

Keras on TensorFlow keeps about 10 MB per trained model even after
``keras.backend.clear_session()`` and ``gc.collect()`` (measured here with
Keras 3.15 / TF 2.21: RSS grew ~10-17 MB per ``fit`` of an identical model;
eager mode does not leak but trains about 60 % slower; the upstream reports
are tensorflow#61791 and keras#21090). A search of hundreds of folds would
grow without bound, so those heads fit each fold in a child process that is
replaced after ``folds_per_worker`` folds: memory stays bounded and the parent
never grows. The child receives ``X``, ``y`` and ``groups`` once, when it
starts; each fold sends only row positions and parameters.
"""

from __future__ import annotations

import gc
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from classifiers.cv import Fold, scored_rows

_DATA: dict[str, np.ndarray] = {}


def _init_worker(X: np.ndarray, y: np.ndarray, groups: np.ndarray) -> None:
    _DATA.update(X=X, y=y, groups=groups)


def _fit_predict(head: str, params: dict, train: np.ndarray,
                 test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from classifiers.registry import create_head, get_head_spec

    X, y, groups = _DATA["X"], _DATA["y"], _DATA["groups"]
    estimator = create_head(head, **params).fit(X[train], y[train], groups=groups[train])
    out = estimator.classes_, estimator.predict_proba(X[test])
    del estimator
    get_head_spec(head).cls.clear_backend()
    gc.collect()
    return out


class FoldWorker:
    """A one-process pool fitting ``head`` fold by fold; use as a context manager.

    ``X (n_rows, n_features)``, ``y (n_rows,)`` and ``groups (n_rows,)`` are
    sent to each new child once. A child that dies (killed, out of memory)
    fails the current fold with :class:`RuntimeError`; the next fold starts a
    new child.
    """

    def __init__(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray, *,
                 folds_per_worker: int = 10):
        self._args = (X, y, groups)
        self.folds_per_worker = folds_per_worker
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: a forked child would inherit the parent's
            # TensorFlow threads and state, which TensorFlow does not support.
            self._pool = ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                initargs=self._args, max_tasks_per_child=self.folds_per_worker)
        return self._pool

    def fit_predict(self, head: str, params: dict[str, Any],
                    fold: Fold) -> tuple[np.ndarray, np.ndarray]:
        """``(classes_, proba (len(scored_rows(fold)), n_fitted_classes))`` of one fold."""
        try:
            return self._executor().submit(_fit_predict, head, dict(params), fold.train,
                                           scored_rows(fold)).result()
        except BrokenProcessPool as err:
            self.close()
            raise RuntimeError(f"The worker process fitting {head!r} died (killed or out of "
                               f"memory?); the next fold starts a new one.") from err

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> FoldWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
