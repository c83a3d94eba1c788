"""The dataset manifest: one SQLite file listing every image of a dataset folder.

Tables
------
``images``
    One row per image file, keyed by its displayable POSIX path relative to the
    dataset root. ``raw_path`` keeps the exact ``os.fsencode`` bytes so that file
    names that are not UTF-8 can be reopened; ``image_id`` is the SHA-256 of the
    bytes. Rows are never deleted: a file that disappears gets ``missing = 1``,
    so feature tables keyed by ``image_id`` keep their provenance.
``rejected``
    Every entry of the folder that was not scanned, with the reason. Replaced at
    each scan.
``ingested``
    One row per image that ``featurestore ingest`` received (keyed by
    ``image_id``; its bytes are in ``STORE/ingested/``). ``split`` is ``inbox``
    for an image given without a label; ``name`` is the client's file name,
    for display only and never used as a path. A label attached later (a
    labelled ingest of an inbox image) updates ``label``/``split`` and sets
    ``labelled_at``; readers overlay it on the table rows, which stay as written.
``meta``
    JSON-encoded key/values: ``root``, ``layout``, ``seed``, ``val_fraction``,
    ``test_fraction``, ``last_scan_at``, ``schema_version``.

Writes happen in explicit transactions (see :meth:`Manifest.transaction`), so a
scan killed midway leaves whole batches only. In the class-folders layout rows
are written with ``split = NULL`` and receive their split in one final
transaction; such "pending" rows are hidden from :meth:`Manifest.images` and
are placed by the next scan if the previous one was interrupted.

The public readers return :class:`pandas.DataFrame` objects for analysts.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections import Counter, defaultdict
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Iterable, Mapping

import pandas as pd

from featurestore import _sqlite
from featurestore._io import utc_now
from featurestore.errors import FeatureStoreError
from featurestore.layout import display, is_within
from featurestore.splits import INBOX, SPLITS

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    path TEXT PRIMARY KEY,
    raw_path BLOB NOT NULL,
    image_id TEXT NOT NULL,
    label TEXT NOT NULL,
    split TEXT CHECK (split IN ('train', 'val', 'test')),
    size_bytes INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    width INTEGER,
    height INTEGER,
    mode TEXT,
    format TEXT,
    missing INTEGER NOT NULL DEFAULT 0 CHECK (missing IN (0, 1)),
    added_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS images_image_id ON images (image_id);
CREATE TABLE IF NOT EXISTS rejected (
    path TEXT NOT NULL,
    raw_path BLOB NOT NULL,
    reason TEXT NOT NULL,
    size_bytes INTEGER,
    seen_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS ingested (
    image_id TEXT PRIMARY KEY,
    file TEXT NOT NULL,
    name TEXT NOT NULL,
    label TEXT NOT NULL,
    split TEXT NOT NULL CHECK (split IN ('train', 'val', 'test', 'inbox')),
    size_bytes INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    format TEXT NOT NULL,
    added_at TEXT NOT NULL,
    labelled_at TEXT
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

INGESTED_COLUMNS = ("image_id", "file", "name", "label", "split", "size_bytes", "width",
                    "height", "format", "added_at", "labelled_at")
IMAGE_COLUMNS = (
    "path", "raw_path", "image_id", "label", "split", "size_bytes", "mtime_ns",
    "width", "height", "mode", "format", "missing", "added_at",
)  # fmt: skip

# A modified file keeps its split and its first-seen time; everything read from the file is refreshed.
_UPSERT = f"""
INSERT INTO images ({", ".join(IMAGE_COLUMNS)}) VALUES ({", ".join("?" * len(IMAGE_COLUMNS))})
ON CONFLICT (path) DO UPDATE SET
    raw_path = excluded.raw_path, image_id = excluded.image_id, label = excluded.label,
    split = COALESCE(excluded.split, images.split), size_bytes = excluded.size_bytes,
    mtime_ns = excluded.mtime_ns, width = excluded.width, height = excluded.height,
    mode = excluded.mode, format = excluded.format, missing = 0
"""


class Manifest:
    """A dataset manifest stored as a SQLite file.

    Parameters
    ----------
    path : str or os.PathLike
        The SQLite file, e.g. ``STORE/manifest.sqlite``.
    create : bool, default False
        Create the file (not its folder) when it does not exist. Readers leave it
        False so a mistyped path fails instead of showing an empty manifest.
    """

    def __init__(self, path: str | os.PathLike, *, create: bool = False):
        self.path = Path(path)
        try:
            self._conn = _sqlite.connect(self.path, mode="rwc" if create else "rw",
                                         schema=_SCHEMA)
        except sqlite3.Error as err:
            hint = "" if create else " (pass create=True, or run `featurestore scan`, to make a new one)"
            raise FeatureStoreError(f"Cannot open manifest {self.path}: {err}{hint}") from err
        if self.get_meta("schema_version") is None:
            with self.transaction():
                self.set_meta(schema_version=SCHEMA_VERSION)

    # -- life cycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Close the SQLite connection."""
        self._conn.close()

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Manifest({str(self.path)!r}, root={str(self.root) if self.root else None!r})"

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        """Run the block as one atomic write: all of it is committed, or none of it."""
        return _sqlite.transaction(self._conn)

    # -- meta -------------------------------------------------------------------------------

    def get_meta(self, key: str, default=None):
        """Value stored under ``key`` in the ``meta`` table, or ``default``."""
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set_meta(self, **values) -> None:
        """Store JSON-serialisable ``values``; call inside :meth:`transaction`."""
        # JSON keeps the surrogate escapes of non-UTF-8 root paths, which SQLite text cannot.
        self._conn.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [(key, json.dumps(value)) for key, value in values.items()],
        )

    @property
    def root(self) -> Path | None:
        """Absolute, resolved dataset root recorded by the first scan, or None before any scan."""
        root = self.get_meta("root")
        return None if root is None else Path(root)

    # -- readers for analysts ---------------------------------------------------------------

    def images(self, split: str | None = None, label: str | None = None, include_missing: bool = False) -> pd.DataFrame:
        """Image rows, one per file, sorted by path.

        Columns are :data:`IMAGE_COLUMNS`. By default only files present at the
        last scan and already given a split are returned; ``include_missing=True``
        returns every row ever seen.
        """
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)} or None; got {split!r}.")
        where, params = [], []
        if not include_missing:
            where.append("missing = 0 AND split IS NOT NULL")
        for column, value in (("split", split), ("label", label)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        sql = f"SELECT {', '.join(IMAGE_COLUMNS)} FROM images"
        sql += f" WHERE {' AND '.join(where)}" if where else ""
        return pd.read_sql_query(sql + " ORDER BY path", self._conn, params=params)

    def rejected(self) -> pd.DataFrame:
        """Entries skipped by the last scan: columns path, raw_path, reason, size_bytes, seen_at."""
        return pd.read_sql_query("SELECT * FROM rejected ORDER BY path", self._conn)

    def counts(self) -> pd.DataFrame:
        """Number of present images, shape ``(n_splits, n_labels)``: index split, columns label."""
        images = self.images()
        table = pd.crosstab(images["split"], images["label"]) if len(images) else pd.DataFrame()
        present = [split for split in SPLITS if split in table.index]
        return table.reindex(present).rename_axis(index="split", columns="label")

    def conflicts(self) -> pd.DataFrame:
        """Content found at several paths of the present images.

        One row per (image_id, kind), with kind ``label_conflict`` (same bytes under
        2+ labels), ``leakage`` (same bytes in 2+ splits) or ``duplicate`` (same
        bytes, same label and split, several paths). Columns: image_id, kind,
        labels, splits, paths (sorted lists).
        """
        images = self.images()
        rows = []
        for image_id, group in images[images.duplicated("image_id", keep=False)].groupby("image_id"):
            labels, splits = sorted(group["label"].unique()), sorted(group["split"].unique())
            kinds = [kind for kind, values in (("label_conflict", labels), ("leakage", splits)) if len(values) > 1]
            for kind in kinds or ["duplicate"]:
                rows.append((image_id, kind, labels, splits, sorted(group["path"])))
        return pd.DataFrame(rows, columns=["image_id", "kind", "labels", "splits", "paths"])

    def absolute_path(self, path_or_row) -> Path:
        """Real filesystem path of an image, rebuilt from its exact ``raw_path`` bytes.

        ``path_or_row`` is a row of :meth:`images` (a Series or mapping with
        ``raw_path`` or ``path``), the raw path bytes, or the displayable relative
        path as stored in the ``path`` column. Raises :class:`FeatureStoreError`
        when the path is unknown or resolves outside the dataset root.
        """
        root = self.root
        if root is None:
            raise FeatureStoreError(f"Manifest {self.path} has no dataset root yet: scan a dataset first.")
        raw = self._raw_path(path_or_row)
        root_b = os.fsencode(root)
        joined = os.path.join(root_b, raw)
        real = os.path.realpath(joined)
        if not is_within(real, os.path.realpath(root_b)):
            raise FeatureStoreError(
                f"Refusing path {display(raw)!r} of manifest {self.path}: it resolves to {display(real)}, "
                f"outside the dataset root {display(root_b)}."
            )
        return Path(os.fsdecode(joined))

    def _raw_path(self, path_or_row) -> bytes:
        if isinstance(path_or_row, (bytes, bytearray)):
            return bytes(path_or_row)
        if isinstance(path_or_row, (pd.Series, Mapping)):
            raw = path_or_row.get("raw_path")
            if isinstance(raw, (bytes, bytearray)):
                return bytes(raw)
            path_or_row = path_or_row.get("path")
        if not isinstance(path_or_row, (str, os.PathLike)):
            raise TypeError(
                "path_or_row must be a relative path (str), raw path bytes or a row with 'raw_path' or 'path'; "
                f"got {type(path_or_row).__name__}."
            )
        path = Path(path_or_row).as_posix()
        row = self._conn.execute("SELECT raw_path FROM images WHERE path = ?", (path,)).fetchone()
        if row is None:
            raise FeatureStoreError(f"Path {path!r} is not in manifest {self.path}; expected a path from images().")
        return bytes(row[0])

    # -- writers used by featurestore.scan --------------------------------------------------

    def known_files(self) -> dict[str, tuple[int, int, str, bool]]:
        """``{path: (size_bytes, mtime_ns, image_id, missing)}`` for every row, present or not."""
        rows = self._conn.execute("SELECT path, size_bytes, mtime_ns, image_id, missing FROM images")
        return {path: (size, mtime, image_id, bool(missing)) for path, size, mtime, image_id, missing in rows}

    def upsert_images(self, rows: Iterable[Mapping]) -> None:
        """Insert or refresh image rows (mappings over :data:`IMAGE_COLUMNS`); inside a transaction.

        An existing row keeps its ``added_at`` and, when the new ``split`` is None, its split.
        """
        self._conn.executemany(_UPSERT, [tuple(row[column] for column in IMAGE_COLUMNS) for row in rows])

    def set_missing(self, paths: Iterable[str], missing: bool) -> int:
        """Flag ``paths`` as missing (or present again); returns how many rows changed."""
        cursor = self._conn.executemany(
            "UPDATE images SET missing = ? WHERE path = ? AND missing != ?",
            [(int(missing), path, int(missing)) for path in paths],
        )
        return cursor.rowcount

    def replace_rejected(self, rows: Iterable[tuple[str, bytes, str, int | None]]) -> None:
        """Replace the ``rejected`` table by ``(path, raw_path, reason, size_bytes)`` rows."""
        seen_at = utc_now()
        self._conn.execute("DELETE FROM rejected")
        self._conn.executemany(
            "INSERT INTO rejected (path, raw_path, reason, size_bytes, seen_at) VALUES (?, ?, ?, ?, ?)",
            [(*row, seen_at) for row in rows],
        )

    def split_state(self) -> tuple[dict, dict, dict, dict]:
        """What :func:`featurestore.splits.assign_splits` needs, read from the present rows.

        Returns ``(pending, assigned_counts, known_splits, pending_paths)``:
        ``{label: {image_id: n_files}}`` for rows without a split,
        ``{label: {split: n_files}}`` for rows with one, ``{image_id: split}`` over
        every row that has a split (present rows win over missing ones), and
        ``{image_id: [path, ...]}`` of the pending rows.
        """
        pending: dict = defaultdict(Counter)
        assigned: dict = defaultdict(Counter)
        known: dict = {}
        pending_paths: dict = defaultdict(list)
        rows = self._conn.execute("SELECT path, label, image_id, split, missing FROM images ORDER BY missing DESC")
        for path, label, image_id, split, missing in rows:
            if split is not None:
                known[image_id] = split
                if not missing:
                    assigned[label][split] += 1
            elif not missing:
                pending[label][image_id] += 1
                pending_paths[image_id].append(path)
        return pending, assigned, known, pending_paths

    def set_splits(self, assignments: Iterable[tuple[str, str]]) -> None:
        """Set the split of ``(path, split)`` pairs; inside a transaction."""
        self._conn.executemany("UPDATE images SET split = ? WHERE path = ?", [(s, p) for p, s in assignments])

    # -- images received by featurestore ingest ---------------------------------------------

    def ingested(self, image_ids: Iterable[str] | None = None) -> pd.DataFrame:
        """Rows of ``ingested`` (:data:`INGESTED_COLUMNS`), oldest first; all, or ``image_ids``."""
        sql = f"SELECT {', '.join(INGESTED_COLUMNS)} FROM ingested"
        params: list = []
        if image_ids is not None:
            params = list(image_ids)
            sql += f" WHERE image_id IN ({', '.join('?' * len(params))})"
        return pd.read_sql_query(sql + " ORDER BY added_at, image_id", self._conn, params=params)

    def known_image_ids(self, image_ids: Iterable[str]) -> set[str]:
        """Which of ``image_ids`` the manifest has, scanned or ingested."""
        wanted = list(dict.fromkeys(image_ids))
        found: set[str] = set()
        for start in range(0, len(wanted), 500):  # SQLite's limit on bound parameters
            chunk = wanted[start: start + 500]
            marks = ", ".join("?" * len(chunk))
            rows = self._conn.execute(
                f"SELECT image_id FROM images WHERE image_id IN ({marks}) AND missing = 0 "
                f"UNION SELECT image_id FROM ingested WHERE image_id IN ({marks})", chunk * 2)
            found.update(row[0] for row in rows)
        return found

    def add_ingested(self, rows: Iterable[Mapping]) -> int:
        """Insert ingested rows (mappings over :data:`INGESTED_COLUMNS`) in one transaction;
        an image id already there is kept as it is. Returns how many were added."""
        values = [tuple(row.get(column) for column in INGESTED_COLUMNS) for row in rows]
        for row in values:
            if row[4] not in (*SPLITS, INBOX):
                raise ValueError(f"split must be one of {', '.join((*SPLITS, INBOX))}; "
                                 f"got {row[4]!r}.")
        with self.transaction():
            before = self._conn.total_changes
            self._conn.executemany(
                f"INSERT OR IGNORE INTO ingested ({', '.join(INGESTED_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(INGESTED_COLUMNS))})", values)
            return self._conn.total_changes - before

    def attach_labels(self, image_ids: Iterable[str], label: str, split: str) -> dict[str, str]:
        """Give inbox images ``label`` in ``split``, in one transaction. Returns
        ``{image_id: ""}`` for each image labelled now, a reason for each refused one
        (labelled already otherwise: that is what views are for); images already
        labelled so are left out."""
        return self.attach_label_map({i: (label, split) for i in image_ids})

    def attach_label_map(self, wanted: Mapping[str, tuple[str, str]], *,
                         all_or_nothing: bool = False) -> dict[str, str]:
        """:meth:`attach_labels` with a ``(label, split)`` per image id; an id the manifest
        lacks gets a reason too. ``all_or_nothing``: any reason, and nothing is written."""
        ids = list(wanted)
        answer: dict[str, str] = {}
        with self.transaction():  # checked and written under one lock: no half labels
            found = []
            for start in range(0, len(ids), 250):  # SQLite's limit on bound parameters
                chunk = ids[start: start + 250]
                marks = ", ".join("?" * len(chunk))
                found += self._conn.execute(
                    f"SELECT image_id, label, split, 1 FROM ingested WHERE image_id IN "
                    f"({marks}) UNION ALL SELECT image_id, label, split, 0 FROM images WHERE "
                    f"image_id IN ({marks}) AND missing = 0", chunk * 2).fetchall()
            seen = {row[0] for row in found}
            answer.update((i, "not in the store") for i in ids if i not in seen)
            for image_id, old_label, old_split, ingested in found:
                if (old_label, old_split) == wanted[image_id] or image_id in answer:
                    continue
                answer[image_id] = "" if ingested and old_split == INBOX else (
                    f"already labelled {old_label!r} in {old_split}; a label is changed "
                    f"through a view (featurestore audit-labels --apply), not by a new ingest")
            if all_or_nothing and any(answer.values()):
                return answer
            now = utc_now()
            self._conn.executemany(
                "UPDATE ingested SET label = ?, split = ?, labelled_at = ? WHERE image_id = ? "
                "AND split = ?", [(*wanted[i], now, i, INBOX) for i, why in answer.items()
                                  if not why])
        return answer

    def attached_labels(self) -> pd.DataFrame:
        """``image_id, label, split`` of the images labelled after their table rows were
        written (see :meth:`attach_labels`); readers overlay them on those rows."""
        return pd.read_sql_query("SELECT image_id, label, split FROM ingested WHERE "
                                 "labelled_at IS NOT NULL", self._conn)
