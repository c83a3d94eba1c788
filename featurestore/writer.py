"""Writing feature tables: buffered appends, atomic parts, one writer per table.

Layout of a table directory (``STORE/tables/<key>/``)::

    lineage.json            the recipe (see featurestore.lineage)
    .lock, .lock.json       the table writer's lock and who holds it
    hdf5/                   part-000001.h5 ... and the consolidated features.h5
    parquet/                part-000001.parquet ...
    pending/<writer_id>/    parts of shard writers, invisible until Store.commit

Every flush writes one immutable part per format under a hidden temporary
name, fsyncs it and renames it into place, so a writer killed at any instant
leaves the last committed parts readable and no half rows. A table kept in two
formats gets each part in both; a kill between the two is repaired by the next
writer, which copies the part into the format that misses it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from featurestore.errors import FeatureStoreError, LineageMismatchError
from featurestore.formats import DEFAULT_FORMAT, FORMATS, get_format
from featurestore.lineage import Lineage
from featurestore.locking import HeldLock
from featurestore.rows import Rows
from featurestore.tablefiles import (PENDING_DIR, committed_keys, committed_n_features,
                                     ensure_table_dir, next_seq, reconcile_formats,
                                     table_formats, write_part)


class DuplicateRowError(FeatureStoreError, ValueError):
    """A row's ``(image_id, aug_id)`` key is already in the table."""


class TableWriter:
    """Append rows to one table; use as a context manager.

    Parameters
    ----------
    table_dir : Path
        ``STORE/tables/<lineage.key>``.
    lineage : Lineage
        Recipe of every row written; a directory of another recipe is refused.
    formats : sequence of str
        Formats to write (``"hdf5"``, ``"parquet"``). Formats the table already
        has are always kept in step, so both formats hold the same rows.
    writer_id : str or None
        ``None`` for the table writer (exclusive lock, parts visible at each
        flush). A name such as ``"shard-1-of-4"`` makes a part writer: parts go
        to ``pending/<writer_id>/`` and become visible at :meth:`Store.commit`,
        so several part writers can run side by side.
    rows_per_part : int
        Rows buffered before a part is committed; bounds memory at about
        ``rows_per_part * n_features * 4`` bytes.
    consolidate : bool
        Fold HDF5 parts into the single ``features.h5`` on close.
    commit_seconds : float or None
        Also commit the buffer at an append once its oldest row has waited this
        long, so a slow writer killed early keeps its work; None: by rows only.
    """

    def __init__(self, table_dir: Path, lineage: Lineage,
                 formats: Sequence[str] = (DEFAULT_FORMAT,), *, writer_id: str | None = None,
                 rows_per_part: int = 4096, consolidate: bool = True,
                 commit_seconds: float | None = None):
        if not formats:
            raise FeatureStoreError(f"formats must name at least one of {', '.join(FORMATS)}.")
        for name in formats:
            get_format(name)
        if rows_per_part < 1:
            raise FeatureStoreError(f"rows_per_part must be >= 1; got {rows_per_part}.")
        if writer_id is not None and (not writer_id or "/" in writer_id or writer_id[0] == "."):
            raise FeatureStoreError(f"writer_id must be a plain name; got {writer_id!r}.")
        self.table_dir = Path(table_dir)
        self.lineage = lineage
        self.writer_id = writer_id
        self.rows_per_part = rows_per_part
        self.consolidate = consolidate
        self.commit_seconds = commit_seconds
        self._buffered_since = 0.0
        self._requested = list(dict.fromkeys(formats))
        self._buffer: list[Rows] = []
        self._buffered = 0
        self._keys: set[tuple[str, int]] = set()
        self._n_features: int | None = None
        self._lock: HeldLock | None = None
        self.rows_written = 0
        self.parts_written = 0

    # -- life cycle ---------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        """Where this writer's parts go: the table itself, or its pending folder."""
        if self.writer_id is None:
            return self.table_dir
        return self.table_dir / PENDING_DIR / self.writer_id

    def open(self) -> TableWriter:
        ensure_table_dir(self.table_dir, self.lineage)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        what = f"Table {self.lineage.key}" if self.writer_id is None else \
            f"Part writer {self.writer_id!r} of table {self.lineage.key}"
        self._lock = HeldLock(self.data_dir / ".lock", what)
        self._lock.acquire()
        try:
            self.formats = list(dict.fromkeys(table_formats(self.data_dir) + self._requested))
            for name in self.formats:
                (self.data_dir / name).mkdir(exist_ok=True)
                get_format(name).cleanup(self.data_dir / name)
            reconcile_formats(self.data_dir, self.formats, self.lineage)
            self._keys = set(committed_keys(self.table_dir))
            if self.writer_id is not None:
                self._keys |= committed_keys(self.data_dir)
            self._n_features = committed_n_features(self.data_dir, self.formats) or \
                committed_n_features(self.table_dir, table_formats(self.table_dir))
            self._next_seq = next_seq(self.data_dir, self.formats)
        except BaseException:
            self._release()
            raise
        return self

    def close(self) -> None:
        """Commit what is buffered, consolidate, and release the lock."""
        if self._lock is None:
            return
        try:
            self.flush()
            if self.consolidate and self.writer_id is None:
                for name in self.formats:
                    get_format(name).consolidate(self.data_dir / name, self.lineage)
        finally:
            self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> TableWriter:
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            # Keep what was committed; drop the buffer of the failed batch.
            self._buffer, self._buffered = [], 0
            self._release()

    # -- writing ------------------------------------------------------------
    def existing_keys(self) -> set[tuple[str, int]]:
        """``(image_id, aug_id)`` keys committed or buffered so far (a copy)."""
        self._check_open()
        return set(self._keys)

    def known(self, keys) -> np.ndarray:
        """Boolean mask ``(len(keys),)``: which ``(image_id, aug_id)`` keys are already in."""
        self._check_open()
        return np.fromiter((k in self._keys for k in keys), dtype=bool)

    def append(self, features, image_id: Sequence[str], aug_id: Sequence[int] | None = None,
               label: Sequence[str] | None = None, split: Sequence[str] | None = None,
               path: Sequence[str] | None = None,
               aug_params: Sequence[str] | None = None) -> None:
        """Buffer rows; every ``rows_per_part`` rows are committed as a part.

        ``features`` is ``(n_rows, n_features)``; the other arguments are
        per-row sequences (see :class:`~featurestore.rows.Rows`).
        """
        self.append_rows(Rows.build(features, image_id, aug_id, label, split, path, aug_params))

    def append_rows(self, rows: Rows) -> None:
        self._check_open()
        if not len(rows):
            return
        if self._n_features is None:
            self._n_features = rows.n_features
        elif rows.n_features != self._n_features:
            raise LineageMismatchError(
                f"Rows have {rows.n_features} features but table {self.lineage.key} has "
                f"{self._n_features}.")
        keys = rows.keys()
        new = set(keys)
        if len(new) != len(keys) or not new.isdisjoint(self._keys):
            dupes = sorted({k for k in keys if k in self._keys} or
                           {k for k in keys if keys.count(k) > 1})[:3]
            raise DuplicateRowError(
                f"Rows {dupes} are already in table {self.lineage.key} (one row per "
                f"(image_id, aug_id)); skip keys in existing_keys() before appending.")
        self._keys |= new
        if not self._buffered:
            self._buffered_since = time.monotonic()
        self._buffer.append(rows)
        self._buffered += len(rows)
        while self._buffered >= self.rows_per_part:
            self._commit_part(self.rows_per_part)
        if self._buffered and self.commit_seconds is not None and \
                time.monotonic() - self._buffered_since >= self.commit_seconds:
            self._commit_part(self._buffered)

    def flush(self) -> None:
        """Commit every buffered row now (as one part)."""
        self._check_open()
        if self._buffered:
            self._commit_part(self._buffered)

    def _commit_part(self, n: int) -> None:
        # Take the first n buffered rows as views, so a huge append is cut into
        # parts without copying the rest of the buffer for every part.
        taken, need = [], n
        while need:
            head = self._buffer[0]
            if len(head) <= need:
                taken.append(self._buffer.pop(0))
                need -= len(head)
            else:
                taken.append(head.take(slice(0, need)))
                self._buffer[0] = head.take(slice(need, None))
                need = 0
        part = taken[0] if len(taken) == 1 else Rows.concat(taken)
        write_part(self.data_dir, self.formats, self._next_seq, part, self.lineage)
        self._next_seq += 1
        self.parts_written += 1
        self.rows_written += len(part)
        self._buffered -= n
        self._buffered_since = time.monotonic()  # what is left waits from now

    def _check_open(self) -> None:
        if self._lock is None:
            raise FeatureStoreError(
                "The writer is not open; use it as `with store.writer(...) as w:`.")
