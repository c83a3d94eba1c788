"""The shared helpers: one file hasher, one UTC timestamp, one SQLite connect/transaction."""

import hashlib
import sqlite3
from datetime import datetime, timedelta, timezone

import pytest

from featurestore import _sqlite
from featurestore._io import HASH_BLOCK_BYTES, hash_file, utc_now
from featurestore.scan import hash_file as scan_hash_file


def test_hash_file_streams_any_algorithm_over_several_blocks(tmp_path):
    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * (HASH_BLOCK_BYTES // 256 * 2 + 7)  # 2 blocks and a tail
    path.write_bytes(data)
    assert hash_file(path) == hashlib.sha256(data).hexdigest()
    assert hash_file(path, "md5") == hashlib.md5(data).hexdigest()
    assert scan_hash_file is hash_file  # featurestore.scan re-exports the one hasher
    with pytest.raises(ValueError):
        hash_file(path, "no-such-hash")


def test_utc_now_is_iso_utc_to_the_second():
    stamp = datetime.fromisoformat(utc_now())
    assert stamp.utcoffset() == timedelta(0) and stamp.microsecond == 0
    assert abs(datetime.now(timezone.utc) - stamp) < timedelta(seconds=5)


def test_transaction_commits_all_or_nothing(tmp_path):
    conn = _sqlite.connect(tmp_path / "t.sqlite", schema="CREATE TABLE t (x INTEGER UNIQUE);")
    with _sqlite.transaction(conn):
        conn.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(sqlite3.IntegrityError), _sqlite.transaction(conn):
        conn.execute("INSERT INTO t VALUES (2)")
        conn.execute("INSERT INTO t VALUES (1)")  # fails: the 2 must go too
    assert [r[0] for r in conn.execute("SELECT x FROM t")] == [1]
    assert not conn.in_transaction
    conn.close()


def test_connect_modes_and_wal(tmp_path):
    path = tmp_path / "db.sqlite"
    with pytest.raises(sqlite3.OperationalError):
        _sqlite.connect(path, mode="rw")  # a reader never creates the file
    assert not path.exists()
    conn = _sqlite.connect(path, wal=True, schema="CREATE TABLE t (x);")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    reader = _sqlite.connect(path, mode="ro")
    with pytest.raises(sqlite3.OperationalError):
        reader.execute("INSERT INTO t VALUES (1)")
    reader.close()
    with pytest.raises(ValueError, match="mode must be one of"):
        _sqlite.connect(path, mode="w")
