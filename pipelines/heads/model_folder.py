"""One model folder's files: written as a unit, checked before anything in it is used.

Writing (:func:`write_model_folder`). The new folder is built in a hidden
sibling ``.tmp-<hex>-<name>``, its ``model.json`` written last with the
SHA-256 of every file, then swapped in with renames: the previous folder is
moved aside to ``.tmp-<hex>-<name>.old``, the new one renamed into place, the
old one removed. A kill at any instant leaves the previous complete folder or
the new complete one at ``<name>``, never a mix; only between the two renames
is the previous one aside, and the next save or load of that model renames it
back. The next save removes what killed saves left (build folders, folders
aside, recognised by these names and nothing else); the folder it replaces
must carry a ``model.json`` (else it is refused and left alone); saves of one
model take turns (a file lock).

Checking (:func:`read_record`, :func:`checked_file`, :func:`model_files`).
``model.json`` must be a JSON object with the keys every model has; every file
it names must be a plain name that resolves inside the folder, recorded with
its SHA-256, and match it. Pickles are never loaded: a folder whose model is a
pickle (``model.joblib``, written before skops) is refused with the advice to
refit. A hash next to the file it guards catches corruption and a mixed
folder, not a deliberate edit; that is why no file here is trusted to run code.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from featurestore import FeatureStoreError
from featurestore._io import TMP_PREFIX, fsync_path
from featurestore.scan import hash_file

MODEL_JSON = "model.json"
#: Keys every model.json has; a record without one of them is refused, naming it.
REQUIRED_KEYS = ("head", "table_key", "lineage", "params", "files")
#: Suffixes of pickled files, which nothing here ever loads.
PICKLE_SUFFIXES = (".joblib", ".pkl", ".pickle")
_OLD_SUFFIX = ".old"


def _leftover(name: str) -> re.Pattern:
    return re.compile(rf"{re.escape(TMP_PREFIX)}[0-9a-f]{{8}}-{re.escape(name)}"
                      rf"(?P<old>{re.escape(_OLD_SUFFIX)})?")


def write_model_folder(folder: Path, build: Callable[[Path], dict]) -> None:
    """Replace ``folder`` by what ``build(tmp)`` writes into the empty folder ``tmp``.

    ``build`` returns the record for ``model.json``; its ``files`` entry is
    set here to the SHA-256 of every file ``build`` wrote. Raises
    :class:`FeatureStoreError` if ``folder`` exists without a ``model.json``
    (not a model folder: nothing of it is touched).
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(folder.parent / f"{TMP_PREFIX}{folder.name}.lock"):
        _clean_leftovers(folder)
        if folder.is_symlink() or (folder.exists() and not (folder / MODEL_JSON).is_file()):
            raise FeatureStoreError(f"{folder} exists but is a link or holds no {MODEL_JSON}: "
                                    f"not a model folder this project wrote; refusing to "
                                    f"replace it (move it elsewhere, then refit).")
        tmp = folder.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{folder.name}")
        tmp.mkdir()
        try:
            _build(tmp, build)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _swap_in(tmp, folder)


def _build(tmp: Path, build: Callable[[Path], dict]) -> None:
    record = build(tmp)
    written = sorted(p.name for p in tmp.iterdir())
    record["files"] = {name: hash_file(tmp / name) for name in written}
    for name in written:
        fsync_path(tmp / name)
    (tmp / MODEL_JSON).write_text(json.dumps(record, indent=2, default=_json_default),
                                  encoding="utf-8")
    fsync_path(tmp / MODEL_JSON)
    fsync_path(tmp)


def _swap_in(tmp: Path, folder: Path) -> None:
    aside = tmp.with_name(tmp.name + _OLD_SUFFIX)
    if folder.exists():
        os.rename(folder, aside)
    os.rename(tmp, folder)
    fsync_path(folder.parent)
    if aside.exists():
        # model.json first: a removal cut short never leaves a folder that looks like a model.
        (aside / MODEL_JSON).unlink()
        shutil.rmtree(aside)


def _clean_leftovers(folder: Path) -> None:
    """Put back a folder left aside by a kill between the renames; remove other leftovers."""
    recover_aside(folder)
    pattern = _leftover(folder.name)
    for entry in folder.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)


def recover_aside(folder: Path) -> bool:
    """If ``folder`` is missing but a save left it aside, rename it back; True if it did."""
    if folder.exists() or not folder.parent.is_dir():
        return False
    pattern = _leftover(folder.name)
    aside = [e for e in folder.parent.iterdir()
             if (m := pattern.fullmatch(e.name)) and m["old"] and (e / MODEL_JSON).is_file()]
    if not aside:
        return False
    newest = max(aside, key=lambda e: (e / MODEL_JSON).stat().st_mtime)
    with contextlib.suppress(FileExistsError, OSError):
        os.rename(newest, folder)
    return folder.exists()


def _json_default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"Cannot store {type(value).__name__} in {MODEL_JSON}")


def read_record(folder: Path) -> dict:
    """``model.json`` of ``folder`` as a dict; a one-line :class:`FeatureStoreError` if unusable."""
    path = Path(folder) / MODEL_JSON
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise FeatureStoreError(f"Cannot read {path}: {err}. Refit the head with "
                                f"`featurestore fit-heads`.") from err
    if not isinstance(record, dict):
        raise FeatureStoreError(f"{path} holds a JSON {type(record).__name__}, not a model "
                                f"record; refusing it. Refit the head with `featurestore fit-heads`.")
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        raise FeatureStoreError(f"{path} lacks {', '.join(missing)}; refusing to use it. Refit "
                                f"the head with `featurestore fit-heads`.")
    if not isinstance(record["files"], dict):
        raise FeatureStoreError(f"{path}: 'files' must map file names to SHA-256; refusing it.")
    return record


def checked_file(folder: Path, record: dict, name) -> Path:
    """Path of file ``name`` of the model in ``folder`` after every check that it is the saved one.

    ``name`` must be a plain file name that resolves inside ``folder`` (no
    ``..``, no path, no link out), be recorded in ``record['files']`` and
    match its SHA-256.
    """
    folder = Path(folder)
    where = folder / MODEL_JSON
    if not isinstance(name, str) or not name or name in (".", "..") or Path(name).name != name \
            or "\\" in name or name.startswith(TMP_PREFIX):
        raise FeatureStoreError(f"{where} names the file {name!r}, which is not a plain file "
                                f"name in the model folder; refusing it.")
    path = folder / name
    if path.resolve().parent != folder.resolve():
        raise FeatureStoreError(f"{where} names {name!r}, which resolves outside {folder} "
                                f"({path.resolve()}); refusing it.")
    expected = record["files"].get(name)
    if not isinstance(expected, str):
        raise FeatureStoreError(f"{where} records no SHA-256 for {name!r}; refusing to load a "
                                f"file that is not recorded. Refit the head with "
                                f"`featurestore fit-heads`.")
    found = hash_file(path) if path.is_file() else "missing"
    if found != expected:
        raise FeatureStoreError(
            f"{path} does not match the SHA-256 recorded in {MODEL_JSON} (expected "
            f"{expected[:16]}..., found {found[:16]}...); refusing to load it. Refit the "
            f"head with `featurestore fit-heads`.")
    return path


def check_all_files(folder: Path, record: dict) -> None:
    """Every file ``model.json`` records must be present, inside ``folder`` and unchanged."""
    for name in record["files"]:
        checked_file(folder, record, name)


def model_files(folder: Path, record: dict) -> list[str]:
    """Names of the files the head itself loads; refuses pickles and pre-skops records."""
    if "model_files" in record:
        names = record["model_files"]
    elif record.get("format") in ("ubj", "keras") and "model_file" in record:
        names = [record["model_file"]]  # written before heads saved themselves: same files
    else:
        names = [record.get("model_file")] if record.get("model_file") else []
    if not isinstance(names, list) or not names:
        raise FeatureStoreError(f"{Path(folder) / MODEL_JSON} names no model file; refusing it. "
                                f"Refit the head with `featurestore fit-heads`.")
    pickled = [n for n in names if not isinstance(n, str) or n.endswith(PICKLE_SUFFIXES)]
    if record.get("format") == "joblib" or pickled:
        raise FeatureStoreError(
            f"{folder} holds a pickled model ({', '.join(map(str, pickled or names))}), which "
            f"is never loaded: unpickling can run any code. Refit the head with "
            f"`featurestore fit-heads`; it is then saved without pickle.")
    for name in names:
        checked_file(folder, record, name)
    return names
