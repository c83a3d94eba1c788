"""A non-blocking file lock that records and reports who holds it."""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import socket
import sys
import time
from pathlib import Path

import filelock

from featurestore._io import atomic_write_text
from featurestore.errors import WriterLockedError


class HeldLock:
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
