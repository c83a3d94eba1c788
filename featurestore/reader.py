"""Reading feature tables into numpy and pandas, whole, filtered, sliced or in batches.

A reader takes a snapshot of the committed parts when it opens and keeps their
files open, so a writer committing or consolidating meanwhile never changes
what an open reader sees. Metadata (ids, labels, splits) is small and read
once; feature rows are read only for the rows asked for.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from featurestore.errors import FeatureStoreError, LineageMismatchError
from featurestore.formats import get_format
from featurestore.formats.base import Segment
from featurestore.lineage import Lineage
from featurestore.rows import META_COLUMNS
from featurestore.tablefiles import read_table_lineage, table_formats

#: Rows read per block when a filter keeps only some rows of a segment.
_BLOCK_ROWS = 8192
#: Average run length from which a selection is read run by run rather than by blocks.
_MIN_RUN_ROWS = 64


class FeatureArrays(NamedTuple):
    """What :meth:`TableReader.to_numpy` returns.

    X : (n_rows, n_features) float32 features.
    y : (n_rows,) labels (numpy str array).
    ids : (n_rows,) record array of row keys with fields ``image_id`` and
        ``aug_id``, unique in a table (``ids["aug_id"]``, ``pandas.DataFrame(ids)``).
    groups : (n_rows,) source image ids; every augmented view of an image shares
        its group, which is what grouped cross-validation needs.
    """

    X: np.ndarray
    y: np.ndarray
    ids: np.ndarray
    groups: np.ndarray


def _as_set(value) -> set | None:
    if value is None:
        return None
    if isinstance(value, (str, int, np.integer)):
        return {value}
    return set(value)


class TableReader:
    """Read one feature table.

    Parameters
    ----------
    table_dir : Path
        ``STORE/tables/<key>``.
    format : str or None
        ``"hdf5"`` or ``"parquet"``; ``None`` takes HDF5 when present (the
        faster full read), else Parquet.
    labels : DataFrame or None
        ``image_id, label, split`` given to images after their rows were written
        (inbox images labelled later, from the store's manifest): they override
        those rows' ``label`` and ``split`` as read, and the files stay as written.
    """

    def __init__(self, table_dir: Path, format: str | None = None, labels=None):
        self.table_dir = Path(table_dir)
        self._labels = labels
        self.lineage: Lineage = read_table_lineage(self.table_dir)
        available = table_formats(self.table_dir)
        if format is not None and available and format not in available:
            raise FeatureStoreError(
                f"Table {self.key} is not stored as {format!r}; it has: {', '.join(available)}.")
        # A table whose only rows are still pending in part writers reads as empty.
        self.format = format or (available[0] if available else None)
        self._segments: list[Segment] = []
        if self.format in available:
            self._segments = get_format(self.format).open_segments(self.table_dir / self.format)
        self._check_segment_lineage()
        sizes = [s.n_rows for s in self._segments]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._columns: dict[str, np.ndarray] = {}

    def _check_segment_lineage(self) -> None:
        dims = set()
        for seg in self._segments:
            found = seg.read_file_lineage()
            if found != self.lineage:
                self.close()
                raise LineageMismatchError(
                    f"File {self.table_dir / self.format / seg.name} was computed with another "
                    f"recipe than table {self.key}: {found.diff(self.lineage)}.")
            dims.add(seg.n_features)
        if len(dims) > 1:
            self.close()
            raise LineageMismatchError(f"Table {self.key} mixes feature widths {sorted(dims)}.")

    # -- description --------------------------------------------------------
    @property
    def key(self) -> str:
        return self.lineage.key

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def count(self) -> int:
        """Number of rows."""
        return len(self)

    @property
    def dimension(self) -> int:
        """Feature width (``n_features``); 0 for an empty table."""
        return self._segments[0].n_features if self._segments else 0

    def size_bytes(self) -> int:
        """Bytes on disk of this format's files."""
        if self.format is None:
            return 0
        return sum(p.stat().st_size for p in (self.table_dir / self.format).rglob("*")
                   if p.is_file())

    def column(self, name: str) -> np.ndarray:
        """One metadata column for every row, ``(n_rows,)``; read once, then cached."""
        if name not in META_COLUMNS:
            raise FeatureStoreError(
                f"Unknown column {name!r}; metadata columns are {', '.join(META_COLUMNS)}.")
        if name not in self._columns:
            parts = [seg.read_meta([name])[name] for seg in self._segments]
            column = np.concatenate(parts) if parts else \
                np.array([], dtype=np.int32 if name == "aug_id" else str)
            self._columns[name] = self._overlay(name, column)
        return self._columns[name]

    def _overlay(self, name: str, column: np.ndarray) -> np.ndarray:
        if self._labels is None or name not in ("label", "split") or not len(column):
            return column
        later = pd.Series(self._labels[name].to_numpy(), index=self._labels["image_id"])
        given = pd.Series(self.column("image_id")).map(later).to_numpy()
        return np.where(pd.isna(given), column, given).astype(str)

    def metadata(self) -> pd.DataFrame:
        """Every row's metadata (:data:`~featurestore.rows.META_COLUMNS`), in row order."""
        return pd.DataFrame({name: self.column(name) for name in META_COLUMNS})

    def keys(self) -> set[tuple[str, int]]:
        """The ``(image_id, aug_id)`` key of every row."""
        return set(zip(self.column("image_id").tolist(), self.column("aug_id").tolist()))

    # -- selection ----------------------------------------------------------
    def select(self, *, split=None, label=None, aug=None) -> np.ndarray | None:
        """Row positions matching the filters, or ``None`` when nothing is filtered.

        ``split``/``label``: a value or a collection of values. ``aug``:
        ``"raw"`` (aug_id 0), ``"augmented"`` (aug_id > 0), ``"all"``/``None``,
        or aug ids (an int or a collection).
        """
        if split is None and label is None and aug in (None, "all"):
            return None
        mask = np.ones(len(self), dtype=bool)
        for name, wanted in (("split", _as_set(split)), ("label", _as_set(label))):
            if wanted is not None:
                mask &= pd.Series(self.column(name)).isin([str(w) for w in wanted]).to_numpy()
        if aug == "raw":
            mask &= self.column("aug_id") == 0
        elif aug == "augmented":
            mask &= self.column("aug_id") > 0
        elif aug not in (None, "all"):
            if isinstance(aug, str):
                raise FeatureStoreError(
                    f"aug must be 'raw', 'augmented', 'all' or aug ids; got {aug!r}.")
            mask &= np.isin(self.column("aug_id"), list(_as_set(aug)))
        return np.flatnonzero(mask)

    def read_features(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Features of the given sorted row positions (all rows when ``None``).

        Returns ``(len(rows), n_features)`` float32. Memory beyond the result
        is bounded by one block of rows.
        """
        if rows is None:
            out = np.empty((len(self), self.dimension), dtype=np.float32)
            for seg, start in zip(self._segments, self._offsets):
                seg.read_features_into(out[start: start + seg.n_rows], 0, seg.n_rows)
            return out
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (np.any(np.diff(rows) < 0) or rows[0] < 0 or rows[-1] >= len(self)):
            raise FeatureStoreError(
                f"Row positions must be sorted and within [0, {len(self)}).")
        out = np.empty((rows.size, self.dimension), dtype=np.float32)
        seg_of_row = np.searchsorted(self._offsets, rows, side="right") - 1
        done = 0
        for i, seg in enumerate(self._segments):
            local = rows[seg_of_row == i] - self._offsets[i]
            if local.size == 0:
                continue
            if local.size == seg.n_rows:
                seg.read_features_into(out[done: done + local.size], 0, seg.n_rows)
            else:
                self._read_sparse(seg, local, out[done: done + local.size])
            done += local.size
        return out

    @staticmethod
    def _read_sparse(seg: Segment, local: np.ndarray, out: np.ndarray) -> None:
        starts = np.flatnonzero(np.diff(local, prepend=-2) != 1)
        if len(starts) * _MIN_RUN_ROWS <= local.size:
            # Long runs (slices, split filters on sorted tables): read each in place.
            ends = np.append(starts[1:], local.size)
            for a, b in zip(starts, ends):
                seg.read_features_into(out[a:b], int(local[a]), int(local[b - 1]) + 1)
            return
        # Scattered rows: read bounded blocks and gather the wanted rows from each.
        written = 0
        for b0 in range(int(local[0]) - int(local[0]) % _BLOCK_ROWS, int(local[-1]) + 1,
                        _BLOCK_ROWS):
            want = local[(local >= b0) & (local < b0 + _BLOCK_ROWS)]
            if want.size:
                lo, hi = int(want[0]), int(want[-1]) + 1
                np.take(seg.read_features(lo, hi), want - lo, axis=0,
                        out=out[written: written + want.size])
                written += want.size

    # -- outputs ------------------------------------------------------------
    def to_numpy(self, *, split=None, label=None, aug=None) -> FeatureArrays:
        """``(X, y, ids, groups)`` for the filtered rows (see :class:`FeatureArrays`)."""
        rows = self.select(split=split, label=label, aug=aug)
        take = (lambda a: a) if rows is None else (lambda a: a[rows])
        image_id, aug_id = take(self.column("image_id")), take(self.column("aug_id"))
        ids = np.rec.fromarrays([image_id, aug_id], names="image_id,aug_id")
        return FeatureArrays(self.read_features(rows), take(self.column("label")), ids, image_id)

    def to_pandas(self, *, split=None, label=None, aug=None, wide: bool = False) -> pd.DataFrame:
        """Metadata columns plus the features.

        ``wide=False``: one ``features`` column holding each row's
        ``(n_features,)`` array (the Parquet layout). ``wide=True``: one float32
        column per feature, ``f0000``, ``f0001``, ...
        """
        rows = self.select(split=split, label=label, aug=aug)
        meta = self.metadata() if rows is None else self.metadata().iloc[rows]
        meta = meta.reset_index(drop=True)
        X = self.read_features(rows)
        if wide:
            width = max(4, len(str(max(X.shape[1] - 1, 0))))
            feats = pd.DataFrame(X, columns=[f"f{i:0{width}d}" for i in range(X.shape[1])])
            return pd.concat([meta, feats], axis=1)
        meta["features"] = list(X)
        return meta

    def iter_batches(self, batch_size: int = 4096, *, split=None, label=None,
                     aug=None) -> Iterator[tuple[np.ndarray, pd.DataFrame]]:
        """Yield ``(X_batch, meta_batch)`` of at most ``batch_size`` filtered rows."""
        if batch_size < 1:
            raise FeatureStoreError(f"batch_size must be >= 1; got {batch_size}.")
        rows = self.select(split=split, label=label, aug=aug)
        if rows is None:
            rows = np.arange(len(self))
        meta = self.metadata()
        for start in range(0, rows.size, batch_size):
            chunk = rows[start: start + batch_size]
            yield self.read_features(chunk), meta.iloc[chunk].reset_index(drop=True)

    def read_rows(self, start: int, stop: int) -> tuple[np.ndarray, pd.DataFrame]:
        """Rows ``[start, stop)`` as ``(X, meta)`` without reading the rest."""
        start, stop, _ = slice(start, stop).indices(len(self))
        chunk = np.arange(start, max(start, stop))
        return self.read_features(chunk), self.metadata().iloc[chunk].reset_index(drop=True)

    # -- resources ----------------------------------------------------------
    def close(self) -> None:
        for seg in self._segments:
            seg.close()
        self._segments = []

    def __enter__(self) -> TableReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"TableReader(key={self.key!r}, format={self.format!r}, rows={len(self)}, "
                f"dimension={self.dimension})")


def concat(readers: Sequence[TableReader], *, split=None, label=None,
           aug=None) -> FeatureArrays:
    """Stack the filtered rows of several readers of one recipe into one FeatureArrays.

    Readers of different lineage (another backbone, pooling, weights, ...) are
    refused: their features live in different spaces.
    """
    readers = list(readers)
    if not readers:
        raise FeatureStoreError("concat needs at least one table.")
    first = readers[0]
    for other in readers[1:]:
        if other.lineage != first.lineage:
            fields = "; ".join(f"{k}: {a!r} vs {b!r}"
                               for k, (a, b) in first.lineage.diff(other.lineage).items())
            raise LineageMismatchError(
                f"Cannot combine table {first.key} with {other.key}: different lineage "
                f"({fields}).")
    parts = [r.to_numpy(split=split, label=label, aug=aug) for r in readers]
    return FeatureArrays(*(np.concatenate(columns) for columns in zip(*parts)))
