"""Crash-safe file writes: write a hidden temporary, fsync, then rename into place."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path

#: Prefix of in-flight files; readers and listings ignore anything starting with it.
TMP_PREFIX = ".tmp-"


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
