"""A batch of feature-table rows: the unit the writer commits and the formats store."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from featurestore.errors import FeatureStoreError

#: Per-row metadata columns, in storage order. ``features`` is stored beside them.
META_COLUMNS = ("image_id", "aug_id", "label", "split", "path", "aug_params")
_STRING_COLUMNS = ("image_id", "label", "split", "path", "aug_params")


@dataclass
class Rows:
    """Rows keyed by ``(image_id, aug_id)``.

    ``features`` is ``(n_rows, n_features)`` float32; every other field is an
    ``(n_rows,)`` array: ``aug_id`` int32 (0 is the raw image), the rest str.
    """

    features: np.ndarray
    image_id: np.ndarray
    aug_id: np.ndarray
    label: np.ndarray
    split: np.ndarray
    path: np.ndarray
    aug_params: np.ndarray

    @classmethod
    def build(cls, features, image_id: Sequence[str], aug_id: Sequence[int] | None = None,
              label: Sequence[str] | None = None, split: Sequence[str] | None = None,
              path: Sequence[str] | None = None,
              aug_params: Sequence[str] | None = None) -> Rows:
        """Validate and normalise user input; missing string columns become ``""``."""
        features = np.asarray(features)
        if features.ndim != 2:
            raise FeatureStoreError(
                f"features must be a 2-D array (n_rows, n_features); got shape {features.shape}.")
        if not np.issubdtype(features.dtype, np.floating):
            raise FeatureStoreError(f"features must be floating point; got dtype {features.dtype}.")
        features = np.ascontiguousarray(features, dtype=np.float32)
        n = features.shape[0]

        def column(name, values, default):
            if values is None:
                values = [default] * n
            arr = np.asarray(values)
            if arr.shape != (n,):
                raise FeatureStoreError(
                    f"Column {name!r} has shape {arr.shape}; expected ({n},) to match features.")
            return arr

        aug = column("aug_id", aug_id, 0)
        if n and not np.issubdtype(aug.dtype, np.integer):
            raise FeatureStoreError(f"aug_id must be integers; got dtype {aug.dtype}.")
        strings = {name: column(name, value, "").astype(object).astype(str).astype(object)
                   for name, value in (("image_id", image_id), ("label", label), ("split", split),
                                       ("path", path), ("aug_params", aug_params))}
        if n and any(len(i) == 0 for i in strings["image_id"]):
            raise FeatureStoreError("image_id must be non-empty for every row.")
        return cls(features=features, aug_id=aug.astype(np.int32), **strings)

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def n_features(self) -> int:
        return self.features.shape[1]

    def keys(self) -> list[tuple[str, int]]:
        """The ``(image_id, aug_id)`` key of each row, in order."""
        return list(zip(self.image_id.tolist(), self.aug_id.tolist()))

    def take(self, index) -> Rows:
        """Rows selected by an integer index array, a boolean mask or a slice."""
        return Rows(**{name: getattr(self, name)[index] for name in ("features",) + META_COLUMNS})

    @classmethod
    def concat(cls, parts: Sequence[Rows]) -> Rows:
        if not parts:
            raise FeatureStoreError("Cannot concatenate zero row batches.")
        return cls(**{name: np.concatenate([getattr(p, name) for p in parts])
                      for name in ("features",) + META_COLUMNS})

    def meta_frame(self) -> pd.DataFrame:
        """The metadata columns as a DataFrame (no features)."""
        return pd.DataFrame({name: getattr(self, name) for name in META_COLUMNS})
