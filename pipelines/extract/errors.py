"""The extract errors table: files that could not be turned into features, and why.

Stored in ``STORE/extract_errors.sqlite``, one row per ``(table_key, path)``::

    table_key  TEXT   feature table the file is missing from
    path       TEXT   path as in the manifest
    image_id   TEXT
    reason     TEXT   short reason ("truncated image", "empty file", ...)
    seen_at    TEXT   UTC time of the failure

A file that fails again replaces its row; a file that later succeeds (fixed or
restored) is removed, so the table always lists what the feature table lacks
and why. SQLite serialises concurrent writers, so shards running side by side
share the file (the manifest makes the same assumption about the store's
filesystem). Read it with :func:`read_errors` or any SQLite client.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable

import pandas as pd

from featurestore import Store, _sqlite
from featurestore._io import utc_now

_SCHEMA = """
CREATE TABLE IF NOT EXISTS extract_errors (
    table_key TEXT NOT NULL,
    path TEXT NOT NULL,
    image_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    seen_at TEXT NOT NULL,
    PRIMARY KEY (table_key, path)
);
"""


class ErrorLog:
    """Record per-file failures of the tables ``table_keys`` in ``store``."""

    def __init__(self, store: str | Path | Store, table_keys: Iterable[str]):
        self.path = Store.of(store, create=False).paths.extract_errors
        self.table_keys = list(table_keys)
        # Shards commit small transactions and must wait (the busy timeout), not fail.
        self._conn = _sqlite.connect(self.path, wal=True, schema=_SCHEMA)
        marks = ",".join("?" * len(self.table_keys))
        # Paths failed in earlier runs: only these need clearing when they succeed,
        # so a healthy run never writes here.
        self._failed = {path for (path,) in self._conn.execute(
            f"SELECT path FROM extract_errors WHERE table_key IN ({marks})", self.table_keys)}

    def record(self, failures: Iterable[tuple[str, str, str]]) -> None:
        """Store ``(path, image_id, reason)`` failures for every table."""
        now = utc_now()
        rows = [(key, path, image_id, reason, now)
                for path, image_id, reason in failures for key in self.table_keys]
        self._failed.update(row[1] for row in rows)
        if rows:
            with _sqlite.transaction(self._conn):
                self._conn.executemany(
                    "INSERT OR REPLACE INTO extract_errors VALUES (?, ?, ?, ?, ?)", rows)

    def clear(self, paths: Iterable[str]) -> None:
        """Forget earlier failures of ``paths``, which now have features."""
        fixed = self._failed.intersection(paths)
        self._failed -= fixed
        rows = [(key, path) for path in fixed for key in self.table_keys]
        if rows:
            with _sqlite.transaction(self._conn):
                self._conn.executemany(
                    "DELETE FROM extract_errors WHERE table_key = ? AND path = ?", rows)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> ErrorLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_errors(store: str | Path | Store, table_key: str | None = None) -> pd.DataFrame:
    """Failures recorded in a store: columns table_key, path, image_id, reason, seen_at."""
    path = Store.of(store, create=False).paths.extract_errors
    columns = ["table_key", "path", "image_id", "reason", "seen_at"]
    if not path.exists():
        return pd.DataFrame(columns=columns)
    with contextlib.closing(_sqlite.connect(path, mode="rw")) as conn:
        sql = f"SELECT {', '.join(columns)} FROM extract_errors"
        params: tuple = ()
        if table_key is not None:
            sql, params = sql + " WHERE table_key = ?", (table_key,)
        return pd.read_sql_query(sql + " ORDER BY table_key, path", conn, params=params)
