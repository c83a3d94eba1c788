"""The report's output folder: only what the report itself wrote is ever replaced.

A finished report carries :data:`MARKER` (``.featurestore-report.json``): the
store it was built from and every file it wrote. An existing ``--out`` folder is
replaced only when

* it is empty, or
* it carries the marker, holds nothing but the files the marker lists (and our
  own temporaries), and was built from the same store; the store's own
  ``STORE/report`` is always that store's, even in a copied or moved store.

Anything else is refused, naming the folder (and the files that are not the
report's), and nothing is deleted: a folder that also holds a user's files is
never swapped away, because its files would vanish into a hidden sibling. A
report of another store is refused too, since it may be the only record of a
store that has changed or gone; a rebuild costs one more run with another
``--out``.

A report is built in a hidden sibling (``.NAME.building-PID``, marker written
first) and swapped in (the old one parked as ``.NAME.old-PID`` until deleted).
Siblings of that name left by killed runs are removed only when they carry the
marker and their process is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from featurestore import FeatureStoreError
from featurestore._io import TMP_PREFIX, atomic_write_text, tmp_target

MARKER = ".featurestore-report.json"
#: Before the marker, a report was recognised by this file alone; such a folder is
#: still replaced when it is the store's own report and holds only what it wrote.
_LEGACY_SUMMARY = "report.json"
_LEGACY_FILES = ("index.html", "report.json", "figures/*.png", "thumbs/*.jpg")
_LEGACY_DIRS = ("figures", "thumbs")


def check_out(out: Path, store_root: Path, *, own: bool) -> None:
    """Refuse an ``out`` that the report may not replace (see the module docstring).

    ``own``: ``out`` is the store's own report folder (``STORE/report``).
    """
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise FeatureStoreError(f"out {out} exists and is not a folder; choose a new folder.")
    if not any(out.iterdir()):
        return
    marker = _read_marker(out, own=own)
    if marker is None:
        raise FeatureStoreError(f"out {out} is not empty and holds no earlier report (no "
                                f"{MARKER}); choose an empty or new folder.")
    built_from = marker.get("store")
    if not own and built_from != str(Path(store_root).resolve()):
        raise FeatureStoreError(f"out {out} holds the report of store {built_from}, not of "
                                f"{Path(store_root).resolve()}; choose another folder.")
    foreign = _unlisted(out, marker["files"])
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5
                                          else "")
        raise FeatureStoreError(f"out {out} holds files the report did not write ({shown}); "
                                f"move them out or choose another folder.")


def start_building(out: Path, store_root: Path) -> Path:
    """A new hidden build folder beside ``out``, marked as ours before anything else."""
    building = out.parent / f".{out.name}.building-{os.getpid()}"
    building.mkdir(parents=True)
    _write_marker(building, store_root, files=None)
    return building


def finish(building: Path, out: Path, store_root: Path,
           echo: Callable[[str], None] = print) -> None:
    """List what the build wrote in its marker, then swap it into place at ``out``."""
    files = sorted(p.relative_to(building).as_posix() for p in building.rglob("*")
                   if p.is_file() and p.name != MARKER)
    _write_marker(building, store_root, files=files)
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        _mark_legacy(out)
        os.replace(out, old)
    os.replace(building, out)
    if old.exists():
        kept = remove_report(old)
        if kept:
            echo(f"Note: kept {len(kept)} file(s) that appeared in the old report while it "
                 f"was rebuilt, in {old}: {', '.join(kept[:5])}")


def remove_stale(out: Path) -> None:
    """Delete build and old folders of killed runs: our name, our marker, process gone."""
    for folder in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = folder.name[len(out.name) + 2:].rpartition("-")
        if kind not in ("building", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if not folder.is_dir() or folder.is_symlink() or not (folder / MARKER).is_file():
            continue
        if kind == "building":
            shutil.rmtree(folder, ignore_errors=True)  # everything in it is the build's
        else:
            remove_report(folder)


def remove_report(folder: Path) -> list[str]:
    """Delete the files ``folder``'s marker lists, our temporaries of them, the marker and
    the folders they leave empty; returns what is left (files nobody listed)."""
    listed = set((_read_marker(folder, own=False) or {}).get("files") or [])
    for name in listed:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError):
            (folder / name).unlink()
    for path in folder.rglob(f"{TMP_PREFIX}*"):
        target = tmp_target(path.name)
        if target and path.is_file() and \
                (path.parent / target).relative_to(folder).as_posix() in listed | {MARKER}:
            path.unlink()
    with contextlib.suppress(FileNotFoundError):
        (folder / MARKER).unlink()
    for directory in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        with contextlib.suppress(OSError):
            directory.rmdir()  # only when empty
    with contextlib.suppress(OSError):
        folder.rmdir()
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) \
        if folder.exists() else []


def _read_marker(folder: Path, *, own: bool) -> dict | None:
    """The marker of ``folder``; for the store's own folder an older report (no marker,
    only the files it used to write) reads as a marker listing them."""
    path = folder / MARKER
    if path.is_file():
        try:
            marker = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        files = marker.get("files") if isinstance(marker, dict) else None
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            return None  # a build that never finished, or not our marker
        return marker
    if own and (folder / _LEGACY_SUMMARY).is_file():
        return _legacy_marker(folder)
    return None


def _mark_legacy(folder: Path) -> None:
    """Give a report written before markers (accepted by :func:`check_out`) the marker
    listing its files, so that removing it removes them instead of keeping them all."""
    if not (folder / MARKER).exists() and (folder / _LEGACY_SUMMARY).is_file():
        legacy = _legacy_marker(folder)
        if legacy is not None:
            (folder / MARKER).write_text(json.dumps(legacy), encoding="utf-8")


def _legacy_marker(folder: Path) -> dict | None:
    """A marker for a report written before markers, if it holds only what one wrote."""
    files = []
    for path in folder.rglob("*"):
        name = PurePosixPath(path.relative_to(folder).as_posix())
        if path.is_dir() and not path.is_symlink() and str(name) in _LEGACY_DIRS:
            continue
        if path.is_symlink() or not path.is_file() or not any(
                name.match(pattern) and len(name.parts) == pattern.count("/") + 1
                for pattern in _LEGACY_FILES):
            return None
        files.append(str(name))
    return {"store": None, "files": files}


def _unlisted(folder: Path, listed: list[str]) -> list[str]:
    """Entries of ``folder`` that are neither a listed file, a folder on the way to one,
    the marker, nor a temporary of ours for one of them."""
    allowed = set(listed) | {MARKER}
    parents = {parent.as_posix() for name in listed for parent in Path(name).parents}
    unlisted = []
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        target = tmp_target(path.name)
        if target is not None:
            name = (path.parent / target).relative_to(folder).as_posix()
        is_dir = path.is_dir() and not path.is_symlink()
        if not (name in allowed and not is_dir) and not (is_dir and name in parents):
            unlisted.append(path.relative_to(folder).as_posix())
    return unlisted


def _write_marker(folder: Path, store_root: Path, files: list[str] | None) -> None:
    atomic_write_text(folder / MARKER, json.dumps(
        {"store": str(Path(store_root).resolve()), "files": files}, indent=2))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a leftover of an earlier run that had our pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
