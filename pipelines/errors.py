"""Failures of a whole run that deserve one line, not a traceback; shared by every command.

Per-file problems (a broken image) are each stage's business: they are listed
and the run goes on. This module covers the run itself stopping for a reason
outside the user's input:

* the store (or ``--out``) cannot be written: no space left, quota exceeded,
  read-only file system. Every store writer commits whole parts atomically, so
  what was committed before stays readable and a rerun resumes. Exit status
  :data:`EXIT_CANNOT_WRITE` (4), so a script can tell "free space and rerun"
  from a bug;
* a :class:`RunFailed` such as :class:`WorkerDiedError` (an extract worker
  killed, or out of memory): exit status 1.

:func:`one_line_failures` wraps a Click command's callback; ``pipelines.cli``
applies it to every registered command, so no command can forget it.
"""

from __future__ import annotations

import errno
import functools
import re
import sqlite3

import click

#: Exit status of a run stopped by a failure that a rerun resumes (a dead worker).
EXIT_FAILED = 1
#: Exit status of a run that could not write (disk full, quota, read-only file system).
EXIT_CANNOT_WRITE = 4

#: errno values that mean "the file system refuses more writes", with their wording.
WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
}
# HDF5 names the file it failed on only inside its message.
_HDF5_FILENAME = re.compile(r"filename = '([^']+)'")


class RunFailed(RuntimeError):
    """The run stopped; ``str(err)`` is one line saying what happened and what to do."""

    exit_code = EXIT_FAILED


class WorkerDiedError(RunFailed):
    """A worker process ended without a word (SIGKILL, the out-of-memory killer, ...)."""


class _OneLine(click.ClickException):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def write_failure(err: BaseException) -> BaseException | None:
    """The "cannot write" error in ``err``'s chain of causes (itself included), or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
            return err
        if isinstance(err, sqlite3.Error) and \
                getattr(err, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return err
        err = err.__cause__ or err.__context__
    return None


def cannot_write_message(failure: BaseException, where: str | None = None) -> str:
    """One line: what could not be written, why, and that a rerun after freeing space resumes."""
    if isinstance(failure, OSError):
        reason = WRITE_ERRNOS[failure.errno]
        match = _HDF5_FILENAME.search(str(failure))
        target = failure.filename or (match.group(1) if match else None)
    else:  # SQLite says only "database or disk is full"
        reason, target = "no space left on device (SQLite: database or disk is full)", None
    if target:
        what = f"cannot write {target}" + (f" ({where})" if where else "")
    else:
        what = f"cannot write to {where}" if where else "cannot write"
    return (f"{what}: {reason}. What was committed before is kept; free space "
            f"(or make it writable) and rerun the same command to resume.")


def one_line_failures(callback):
    """Wrap a Click callback: write failures and :class:`RunFailed` become one ``Error:`` line.

    Any other exception keeps its traceback: it is a bug to report, not a
    message. A command that turned a write failure into its own error (a
    ``ClickException`` raised ``from`` it) is reported as a write failure too.
    """
    if getattr(callback, "_one_line_failures", False):
        return callback

    @functools.wraps(callback)
    def wrapper(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except RunFailed as err:
            raise _OneLine(str(err), err.exit_code) from err
        except Exception as err:
            failure = write_failure(err)
            if failure is None:
                raise
            raise _OneLine(cannot_write_message(failure, _where(kwargs)),
                           EXIT_CANNOT_WRITE) from err

    wrapper._one_line_failures = True
    return wrapper


def _where(params: dict) -> str | None:
    """The store (and output) a command writes to, from its Click parameters."""
    places = [f"{label} {params[name]}" for name, label in (("store", "store"), ("out", "output"))
              if params.get(name)]
    return " or ".join(places) or None
