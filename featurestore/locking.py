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

#: How long to wait for a lock whose recorded holder on this host is dead or dying: the
#: kernel frees a killed process's lock only once its memory is torn down.
DEAD_HOLDER_WAIT_S = 30.0


class HeldLock:
    """A non-blocking file lock that records and reports who holds it."""

    def __init__(self, path: Path, what: str):
        self.path = path
        self.info_path = path.with_name(path.name + ".json")
        self.what = what
        self._lock = filelock.FileLock(str(path), timeout=0)

    def acquire(self) -> None:
        try:
            try:
                self._lock.acquire()
            except filelock.Timeout:
                if not self._holder_gone():
                    raise
                self._lock.acquire(timeout=DEAD_HOLDER_WAIT_S, poll_interval=0.05)
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

    def _holder_gone(self) -> bool:
        """Whether the recorded holder is a process of this host that is gone or exiting."""
        try:
            h = json.loads(self.info_path.read_text())
            pid = int(h["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if h.get("host") != socket.gethostname() or pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            pass
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:  # no /proc: alive is all we know
            return False
        # Zombie or dead, or exiting (PF_EXITING): a kill -9 in progress.
        return fields[0] in ("Z", "X") or bool(int(fields[6]) & 0x4)

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
