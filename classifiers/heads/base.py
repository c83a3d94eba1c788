"""What every head shares: input checks, class weights, inner grouped splits.

Every head is a scikit-learn classifier: ``__init__`` only stores its
parameters, ``fit(X, y, groups=None, sample_weight=None)`` returns ``self``,
learned state ends in ``_`` (``classes_``, ``n_features_in_``) and
``predict_proba`` rows sum to 1. ``groups`` is optional and only used by heads
that split their training rows again (early stopping, calibration), so that
augmented views of one image never sit on both sides of that inner split.

Class weights are applied uniformly as sample weights (``class_weight`` is
``None``, ``"balanced"`` or a ``{label: weight}`` map, labels matched by their
string form so ``{"1": 3}`` from the command line works on integer labels).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import StratifiedKFold
from sklearn.utils.class_weight import compute_sample_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from classifiers.errors import ClassifierError

#: Rows predicted per call, bounding the memory of a prediction.
PREDICT_BATCH = 8192
#: File of the heads saved through ``skops.io`` (every scikit-learn head).
SKOPS_FILE = "model.skops"


class HeadBase(ClassifierMixin, BaseEstimator):
    """Base class of the registered heads (no parameters of its own).

    Subclasses implement ``fit`` with :meth:`_prepare_fit` and ``_proba(X)``
    for already validated ``X``; ``predict_proba`` and ``predict`` come from here.

    Saving: :meth:`save` writes the fitted head into a folder the caller owns
    and returns the names of the files written; :meth:`fitted_state` is the
    JSON-ready state that travels beside them; :meth:`load` rebuilds the head
    from those files. Nothing is ever unpickled: the default is a ``skops.io``
    file that may hold only trusted types (skops's defaults, the head's own
    class and ``trusted_types``); heads with a native format (XGBoost ``.ubj``,
    Keras ``.keras``) override the three methods. :meth:`clear_backend`
    releases what a head's library keeps between fits (the Keras session).
    """

    head_name: ClassVar[str] = ""
    #: Types beyond skops's defaults and the head's own class that its file may hold.
    trusted_types: ClassVar[tuple[str, ...]] = ()

    # -- fitting helpers ----------------------------------------------------
    def _prepare_fit(self, X, y, sample_weight=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Validate ``X (n_samples, n_features)`` and ``y (n_samples,)``.

        Sets ``classes_`` and ``n_features_in_``; returns ``(X float32, y
        encoded as 0..n_classes-1, sample weights (n_samples,) float64)``.
        """
        X, y = validate_data(self, X, y, reset=True, dtype=[np.float32, np.float64])
        X = np.asarray(X, dtype=np.float32)
        check_classification_targets(y)
        self.classes_, y_enc = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(
                f"{type(self).__name__} needs samples of at least 2 classes; got 1 class "
                f"({self.classes_[0]!r}).")
        return X, y_enc, self._sample_weights(y_enc, sample_weight, len(y))

    def _sample_weights(self, y_enc: np.ndarray, sample_weight, n: int) -> np.ndarray:
        weight = np.ones(n) if sample_weight is None else \
            np.asarray(sample_weight, dtype=np.float64).reshape(-1)
        if weight.shape != (n,):
            raise ValueError(f"sample_weight must have shape ({n},); got {weight.shape}.")
        if weight.sum() <= 0:
            raise ValueError("sample_weight sums to zero (all weights are zero); nothing to fit.")
        class_weight = getattr(self, "class_weight", None)
        if class_weight is None or class_weight == "none":
            return weight
        if isinstance(class_weight, Mapping):
            by_name = {str(k): float(v) for k, v in class_weight.items()}
            unknown = set(by_name) - {str(c) for c in self.classes_}
            if unknown:
                raise ValueError(
                    f"class_weight names classes {sorted(unknown)} that are not in the labels; "
                    f"classes: {', '.join(map(str, self.classes_))}.")
            class_weight = {i: by_name.get(str(c), 1.0) for i, c in enumerate(self.classes_)}
        elif class_weight != "balanced":
            raise ValueError(
                f"class_weight must be None, 'balanced' or a {{label: weight}} map; "
                f"got {class_weight!r}.")
        return weight * compute_sample_weight(class_weight, y_enc)

    def _check_X(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float32, np.float64])
        return np.asarray(X, dtype=np.float32)

    # -- prediction -----------------------------------------------------------
    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities ``(n_samples, n_classes)`` in the order of ``classes_``."""
        X = self._check_X(X)
        proba = np.asarray(self._proba(X), dtype=np.float64)
        if proba.ndim == 1:
            proba = np.column_stack([1.0 - proba, proba])
        if not np.all(np.isfinite(proba)):
            raise FloatingPointError(
                f"{type(self).__name__} produced non-finite probabilities (a diverged fit).")
        proba = np.clip(proba, 0.0, None)
        return proba / proba.sum(axis=1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        """Most probable class per row, ``(n_samples,)``."""
        proba = self.predict_proba(X)  # first: it raises NotFittedError before fit
        return self.classes_[np.argmax(proba, axis=1)]

    def _proba(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    # -- saving and loading ---------------------------------------------------
    def save(self, folder: Path) -> list[str]:
        """Write the fitted head into the existing folder ``folder``; returns the file names."""
        import skops.io

        check_is_fitted(self)
        skops.io.dump(self, folder / SKOPS_FILE)
        return [SKOPS_FILE]

    def fitted_state(self) -> dict[str, Any]:
        """JSON-ready fitted attributes that travel beside the saved files."""
        check_is_fitted(self)
        return {"classes_": self.classes_.tolist(), "n_features_in_": int(self.n_features_in_)}

    @classmethod
    def load(cls, folder: Path, files: list[str], state: Mapping[str, Any],
             params: Mapping[str, Any]) -> HeadBase:
        """The head that :meth:`save` wrote as ``files`` in ``folder``.

        ``state`` is :meth:`fitted_state`, ``params`` the constructor
        parameters. Raises :class:`ClassifierError` for a file that holds any
        type outside the trusted list (naming the types) or another head.
        """
        import skops.io

        path = folder / expect_file(cls, files, SKOPS_FILE)
        allowed = {f"{cls.__module__}.{cls.__qualname__}", *cls.trusted_types}
        found = skops.io.get_untrusted_types(file=path)
        refused = sorted(set(found) - allowed)
        if refused:
            raise ClassifierError(
                f"{path} holds type(s) {', '.join(refused)} that head {cls.head_name!r} does "
                f"not trust; refusing to load it.")
        head = skops.io.load(path, trusted=list(found))
        if type(head) is not cls:
            raise ClassifierError(f"{path} holds a {type(head).__name__}, not a "
                                  f"{cls.__name__}; refusing to use it.")
        return head

    def _restore_state(self, state: Mapping[str, Any]) -> None:
        self.classes_ = np.asarray(state["classes_"])
        self.n_features_in_ = int(state["n_features_in_"])

    @classmethod
    def clear_backend(cls) -> None:
        """Release memory the head's library keeps after a model is dropped (none here)."""

    def clear(self) -> None:
        """Drop this head's fitted model and release its library's memory."""
        for name in [n for n in vars(self) if n.endswith("_") and not n.startswith("_")]:
            delattr(self, name)
        type(self).clear_backend()


def expect_file(cls: type, files: list[str], name: str) -> str:
    """``name`` if the head's saved ``files`` hold it; a clear error otherwise."""
    if name not in files:
        raise ClassifierError(f"Head {cls.head_name!r} is saved as {name}; the saved files are "
                              f"{', '.join(files) or 'none'}.")
    return name


def inner_split(y_enc: np.ndarray, groups, fraction: float,
                seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """One stratified split of training rows for early stopping or calibration.

    Grouped when ``groups (n_samples,)`` is given, so views of one image stay
    on one side. Returns ``(train_idx, val_idx)``, or ``None`` when the data is
    too small to hold out ``fraction`` of it with every class on both sides.

    The grouped split stratifies whole groups by the label of their first row
    (every view of an image has its label): a ``StratifiedKFold`` over the
    unique groups. scikit-learn's ``StratifiedGroupKFold`` gives the same
    split quality but took 3.3 s per call on 16,640 groups, which every fold
    of every trial would pay.
    """
    n_splits = max(2, int(round(1.0 / fraction)))
    n_classes = int(y_enc.max()) + 1
    if groups is None:
        keys, labels = np.arange(len(y_enc)), y_enc
        inverse = keys
    else:
        _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
        keys, labels = first, y_enc[first]
    counts = np.bincount(labels, minlength=n_classes)
    if counts.min() < n_splits or len(y_enc) < 10 * n_splits:
        return None
    splitter = StratifiedKFold(n_splits, shuffle=True, random_state=seed)
    _, val_keys = next(splitter.split(np.zeros(len(keys)), labels))
    is_val = np.zeros(len(keys), dtype=bool)
    is_val[val_keys] = True
    val_rows = is_val[inverse.reshape(-1)]
    train, val = np.flatnonzero(~val_rows), np.flatnonzero(val_rows)
    if len(np.unique(y_enc[train])) < n_classes:
        return None
    return train, val
