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

import contextlib
import getpass
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import filelock
import numpy as np

from featurestore._io import atomic_write, atomic_write_text, remove_tmp_files
from featurestore.errors import FeatureStoreError, LineageMismatchError, WriterLockedError
from featurestore.formats import FORMATS, get_format
from featurestore.formats.base import TableFormat, part_name
from featurestore.formats.hdf5 import HDF5Format
from featurestore.lineage import Lineage
from featurestore.rows import Rows

LINEAGE_FILE = "lineage.json"
PENDING_DIR = "pending"


class DuplicateRowError(FeatureStoreError, ValueError):
    """A row's ``(image_id, aug_id)`` key is already in the table."""


def read_table_lineage(table_dir: Path) -> Lineage:
    """The lineage recorded in a table directory."""
    path = Path(table_dir) / LINEAGE_FILE
    try:
        return Lineage.from_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise FeatureStoreError(f"{table_dir} is not a feature table: {LINEAGE_FILE} is missing.") \
            from err
    except (ValueError, TypeError) as err:
        raise FeatureStoreError(f"Cannot parse {path}: {err}") from err


def table_formats(table_dir: Path) -> list[str]:
    """Formats that hold data in a table directory, in registry order."""
    return [name for name in FORMATS if (Path(table_dir) / name).is_dir()]


def ensure_table_dir(table_dir: Path, lineage: Lineage) -> None:
    """Create ``table_dir`` for ``lineage``, or check that it belongs to ``lineage``."""
    table_dir.mkdir(parents=True, exist_ok=True)
    path = table_dir / LINEAGE_FILE
    if not path.exists():
        atomic_write_text(path, json.dumps(lineage.to_dict(), indent=2, sort_keys=True))
        return
    existing = read_table_lineage(table_dir)
    if existing != lineage:
        fields = ", ".join(f"{k}: table has {a!r}, writer has {b!r}"
                           for k, (a, b) in existing.diff(lineage).items())
        raise LineageMismatchError(f"Table {table_dir} holds another recipe ({fields}).")


class _HeldLock:
    """A non-blocking file lock that records and reports who holds it."""

    def __init__(self, path: Path, what: str):
        self.path = path
        self.info_path = path.with_name(path.name + ".json")
        self.what = what
        self._lock = filelock.FileLock(str(path), timeout=0)

    def acquire(self) -> None:
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise WriterLockedError(
                f"{self.what} is being written by {self._holder()}. Wait for that writer to "
                f"finish or stop it; a killed writer releases the lock by itself.") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "user": _user(),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
        atomic_write_text(self.info_path, json.dumps(holder))

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.info_path.unlink()
        with contextlib.suppress(FileNotFoundError):
            self._lock.release()

    def _holder(self) -> str:
        try:
            h = json.loads(self.info_path.read_text())
        except (OSError, ValueError):
            return "another process (it left no holder information)"
        return f"pid {h['pid']} on {h['host']} (user {h['user']}, since {h['since']}, " \
               f"command: {h['command']!r})"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


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
    """

    def __init__(self, table_dir: Path, lineage: Lineage, formats: Sequence[str] = ("hdf5",), *,
                 writer_id: str | None = None, rows_per_part: int = 4096,
                 consolidate: bool = True):
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
        self._requested = list(dict.fromkeys(formats))
        self._buffer: list[Rows] = []
        self._buffered = 0
        self._keys: set[tuple[str, int]] = set()
        self._n_features: int | None = None
        self._lock: _HeldLock | None = None
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
        self._lock = _HeldLock(self.data_dir / ".lock", what)
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
            self._n_features = _committed_n_features(self.data_dir, self.formats) or \
                _committed_n_features(self.table_dir, table_formats(self.table_dir))
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
        self._buffer.append(rows)
        self._buffered += len(rows)
        while self._buffered >= self.rows_per_part:
            self._commit_part(self.rows_per_part)

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

    def _check_open(self) -> None:
        if self._lock is None:
            raise FeatureStoreError(
                "The writer is not open; use it as `with store.writer(...) as w:`.")


def write_part(data_dir: Path, formats: Iterable[str], seq: int, rows: Rows,
               lineage: Lineage) -> None:
    """Commit ``rows`` as part ``seq`` in every format, each file atomically."""
    for name in formats:
        fmt = get_format(name)
        atomic_write(data_dir / name / part_name(seq, fmt.suffix),
                     lambda tmp, fmt=fmt: fmt.write_part(tmp, rows, lineage))


def next_seq(data_dir: Path, formats: Iterable[str]) -> int:
    seqs = set().union(*(get_format(f).committed_seqs(data_dir / f) for f in formats))
    return max(seqs, default=0) + 1


def read_committed_part(data_dir: Path, formats: Iterable[str], seq: int) -> Rows:
    """The rows of part ``seq`` from whichever format still holds them."""
    for name in formats:
        fmt = get_format(name)
        path = data_dir / name / part_name(seq, fmt.suffix)
        if path.exists():
            return fmt.read_part(path)
        if isinstance(fmt, HDF5Format):
            rows = fmt.absorbed_rows(data_dir / name, seq)
            if rows is not None:
                return rows
    raise FeatureStoreError(f"Part {seq} of {data_dir} is in none of the formats {list(formats)}.")


def reconcile_formats(data_dir: Path, formats: Sequence[str], lineage: Lineage) -> int:
    """Copy parts that one format has and another lacks; returns parts copied.

    Happens after a kill between the formats' writes of one part, or when a
    format is added to an existing table (a full backfill). Call under the lock.
    """
    seqs = {name: get_format(name).committed_seqs(data_dir / name) for name in formats}
    copied = 0
    for seq in sorted(set().union(*seqs.values())):
        missing = [name for name in formats if seq not in seqs[name]]
        if missing:
            rows = read_committed_part(data_dir, formats, seq)
            write_part(data_dir, missing, seq, rows, lineage)
            copied += 1
    return copied


def committed_keys(data_dir: Path) -> set[tuple[str, int]]:
    """Keys of every committed row under ``data_dir`` (a table or a pending folder)."""
    formats = table_formats(data_dir)
    if not formats:
        return set()
    fmt = get_format(formats[0])
    keys: set[tuple[str, int]] = set()
    for seg in fmt.open_segments(data_dir / formats[0]):
        try:
            meta = seg.read_meta()
            keys.update(zip(meta["image_id"].tolist(), meta["aug_id"].tolist()))
        finally:
            seg.close()
    return keys


def _committed_n_features(data_dir: Path, formats: Sequence[str]) -> int | None:
    for name in formats:
        segments = get_format(name).open_segments(data_dir / name)
        try:
            if segments:
                return segments[0].n_features
        finally:
            for seg in segments:
                seg.close()
    return None


def commit_pending(table_dir: Path, lineage: Lineage, *, consolidate: bool = True) -> dict:
    """Merge the parts of finished part writers into the table; skip running ones.

    Rows whose key is already committed are dropped (a shard rerun or overlap),
    so the table keeps exactly one row per ``(image_id, aug_id)``.
    Returns ``{"merged": [...], "skipped": {writer: reason}, "rows": n, "duplicates": n}``.
    """
    summary = {"merged": [], "skipped": {}, "rows": 0, "duplicates": 0}
    pending_root = table_dir / PENDING_DIR
    pendings = sorted(p for p in pending_root.glob("*") if p.is_dir())
    formats = table_formats(table_dir) + [f for p in pendings for f in table_formats(p)]
    with TableWriter(table_dir, lineage, list(dict.fromkeys(formats)) or ["hdf5"],
                     consolidate=consolidate) as writer:
        for pending in pendings:
            lock = _HeldLock(pending / ".lock", f"Part writer {pending.name!r}")
            try:
                lock.acquire()
            except WriterLockedError as err:
                summary["skipped"][pending.name] = str(err)
                continue
            try:
                formats = table_formats(pending)
                for name in formats:
                    remove_tmp_files(pending / name)
                part_lineages = _pending_lineages(pending, formats)
                for other in part_lineages:
                    if other != lineage:
                        raise LineageMismatchError(
                            f"Pending parts in {pending} were computed with another recipe "
                            f"({other.diff(lineage)}); refusing to merge them into "
                            f"{lineage.key}.")
                all_seqs = set().union(*(get_format(f).committed_seqs(pending / f)
                                         for f in formats))
                for seq in sorted(all_seqs):
                    rows = read_committed_part(pending, formats, seq)
                    known = writer.existing_keys()
                    keep = np.array([k not in known for k in rows.keys()], dtype=bool)
                    summary["duplicates"] += int((~keep).sum())
                    writer.append_rows(rows.take(keep))
                    writer.flush()
                    summary["rows"] += int(keep.sum())
                summary["merged"].append(pending.name)
                # Delete while still holding the lock, so no part writer of the
                # same name can start writing into a folder that is going away.
                shutil.rmtree(pending)
            finally:
                lock.release()
    with contextlib.suppress(OSError):
        pending_root.rmdir()
    return summary


def _pending_lineages(pending: Path, formats: Sequence[str]) -> list[Lineage]:
    lineages = []
    for name in formats:
        for seg in get_format(name).open_segments(pending / name):
            try:
                lineages.append(seg.read_file_lineage())
            finally:
                seg.close()
    return lineages


__all__ = ["TableWriter", "DuplicateRowError", "commit_pending", "read_table_lineage",
           "table_formats", "TableFormat"]
