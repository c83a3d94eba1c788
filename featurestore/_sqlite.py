"""The store's SQLite files (manifest, views, extract errors) open and write the same way.

Connections are in autocommit mode (``isolation_level=None``): a write that
must be atomic runs inside :func:`transaction`, which takes the write lock up
front (``BEGIN IMMEDIATE``) so two writers queue instead of failing halfway.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Seconds a connection waits for another process's write lock before failing.
BUSY_TIMEOUT_S = 60.0
MODES = ("ro", "rw", "rwc")


def connect(path: str | os.PathLike, *, mode: str = "rwc", timeout: float = BUSY_TIMEOUT_S,
            wal: bool = False, schema: str | None = None) -> sqlite3.Connection:
    """An autocommit connection to the SQLite file ``path``.

    ``mode``: ``ro`` (read only), ``rw`` (the file must exist) or ``rwc`` (created
    if missing; its folder must exist). ``wal`` switches the file to write-ahead
    logging, so readers never block the writer. ``schema`` (SQL script) runs first.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}.")
    uri = f"file:{urllib.parse.quote(os.fsencode(Path(path).absolute()))}?mode={mode}"
    conn = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None)
    try:
        if wal:
            conn.execute("PRAGMA journal_mode=WAL")
        if schema:
            conn.executescript(schema)
    except BaseException:
        conn.close()
        raise
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """Run the block as one atomic write: all of it is committed, or none of it."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
