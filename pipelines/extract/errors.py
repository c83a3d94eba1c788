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
import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import pandas as pd

ERRORS_FILE = "extract_errors.sqlite"

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
    """Record per-file failures of the tables ``table_keys`` in ``store_root``."""

    def __init__(self, store_root: str | Path, table_keys: Iterable[str]):
        self.path = Path(store_root) / ERRORS_FILE
        self.table_keys = list(table_keys)
        # A long busy timeout: shards commit small transactions and must wait, not fail.
        self._conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.executescript(_SCHEMA)
        marks = ",".join("?" * len(self.table_keys))
        # Paths failed in earlier runs: only these need clearing when they succeed,
        # so a healthy run never writes here.
        self._failed = {path for (path,) in self._conn.execute(
            f"SELECT path FROM extract_errors WHERE table_key IN ({marks})", self.table_keys)}

    def record(self, failures: Iterable[tuple[str, str, str]]) -> None:
        """Store ``(path, image_id, reason)`` failures for every table."""
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        rows = [(key, path, image_id, reason, now)
                for path, image_id, reason in failures for key in self.table_keys]
        self._failed.update(row[1] for row in rows)
        if rows:
            with self._transaction():
                self._conn.executemany(
                    "INSERT OR REPLACE INTO extract_errors VALUES (?, ?, ?, ?, ?)", rows)

    def clear(self, paths: Iterable[str]) -> None:
        """Forget earlier failures of ``paths``, which now have features."""
        fixed = self._failed.intersection(paths)
        self._failed -= fixed
        rows = [(key, path) for path in fixed for key in self.table_keys]
        if rows:
            with self._transaction():
                self._conn.executemany(
                    "DELETE FROM extract_errors WHERE table_key = ? AND path = ?", rows)

    def _transaction(self):
        return _Transaction(self._conn)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> ErrorLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Transaction:
    def __init__(self, conn):
        self.conn = conn

    def __enter__(self):
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, *exc):
        self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")


def read_errors(store_root: str | Path, table_key: str | None = None) -> pd.DataFrame:
    """Failures recorded in a store: columns table_key, path, image_id, reason, seen_at."""
    path = Path(store_root) / ERRORS_FILE
    columns = ["table_key", "path", "image_id", "reason", "seen_at"]
    if not path.exists():
        return pd.DataFrame(columns=columns)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        sql = f"SELECT {', '.join(columns)} FROM extract_errors"
        params: tuple = ()
        if table_key is not None:
            sql, params = sql + " WHERE table_key = ?", (table_key,)
        return pd.read_sql_query(sql + " ORDER BY table_key, path", conn, params=params)
