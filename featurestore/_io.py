"""Crash-safe file writes (write a hidden temporary, fsync, then rename into place), file
hashing and the UTC timestamps that the store's records carry."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

#: Prefix of in-flight files; readers and listings ignore anything starting with it.
TMP_PREFIX = ".tmp-"
_TMP_NAME = re.compile(rf"{re.escape(TMP_PREFIX)}[0-9a-f]{{8}}-(?P<target>.+)", re.DOTALL)
#: First characters that make a spreadsheet read a cell as a formula (OWASP "CSV injection").
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")

#: Bytes read at a time by :func:`hash_file`.
HASH_BLOCK_BYTES = 1 << 20


def hash_file(path: str | bytes | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of the file's bytes, streamed in 1 MiB blocks (any ``hashlib`` name)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(HASH_BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def utc_now() -> str:
    """Current UTC time as ISO 8601, to the second: ``2026-12-01T18:44:04+00:00``."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory to make a rename inside it durable (POSIX needs both)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)``, then atomically move the result to ``path``.

    A process killed at any instant leaves either the old ``path`` (or none) or
    the complete new file, never a half-written one; leftovers are hidden
    ``.tmp-*`` files that :func:`remove_tmp_files` cleans up.
    """
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_path(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def remove_tmp_files(directory: Path) -> int:
    """Delete temporaries left by killed writers; returns how many were removed."""
    removed = 0
    if directory.is_dir():
        for entry in directory.iterdir():
            if entry.name.startswith(TMP_PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
                    removed += 1
    return removed


def tmp_target(name: str) -> str | None:
    """The file name a temporary of :func:`atomic_write` was written for; None if not ours."""
    match = _TMP_NAME.fullmatch(name)
    return match["target"] if match else None


def remove_tmp_of(path: Path) -> int:
    """Delete the temporaries that killed writers of ``path`` left beside it, nothing else.

    For files in folders the project does not own (``predict --out``), where
    :func:`remove_tmp_files` would also take a user's own ``.tmp-*`` files.
    """
    path, removed = Path(path), 0
    if path.parent.is_dir():
        for entry in path.parent.iterdir():
            if tmp_target(entry.name) == path.name and entry.is_file():
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
                    removed += 1
    return removed


def neutralise_formula(value):
    """``value`` with a ``'`` in front when a spreadsheet would run it as a formula.

    A value already starting with ``'`` before such a character gets one more, so
    :func:`restore_formula` gives every string back exactly.
    """
    if isinstance(value, str) and value.lstrip("'")[:1] in FORMULA_PREFIXES:
        return "'" + value
    return value


def restore_formula(value):
    """Undo :func:`neutralise_formula` (on a cell read back from one of our CSV files)."""
    if isinstance(value, str) and value[:1] == "'" and value.lstrip("'")[:1] in FORMULA_PREFIXES:
        return value[1:]
    return value


def write_csv(frame, path: Path) -> None:
    """Write a DataFrame atomically as CSV (no index), every text cell and header made
    safe for spreadsheets (:func:`neutralise_formula`); keep the raw values in Parquet."""
    from pandas.api.types import is_bool_dtype, is_datetime64_any_dtype, is_numeric_dtype

    safe = frame.rename(columns=neutralise_formula)
    for column in safe.columns:
        values = safe[column]
        if not (is_numeric_dtype(values) or is_bool_dtype(values)
                or is_datetime64_any_dtype(values)):  # text, whatever pandas calls its dtype
            safe[column] = values.map(neutralise_formula)
    atomic_write(Path(path), lambda tmp: safe.to_csv(tmp, index=False))
