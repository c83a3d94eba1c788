"""Converted models cached in a store's cache folder, trusted only after a content check.

An entry is a folder ``<backbone>-<size>-<digest>/`` named by the hash of the
fields that determine the conversion (weights hash, input size, library
versions, ...). Its ``entry.json`` holds those fields and the SHA-256 of every
file; an entry whose fields or files do not match (a truncated ``.bin``, an
edited ``.xml``) is rebuilt, never loaded. Entries are written beside the final
name and renamed into place, under a file lock, so concurrent workers convert once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import filelock

from featurestore._io import atomic_write_text
from featurestore.scan import hash_file

ENTRY_FILE = "entry.json"
#: How long a process waits for another one converting the same model.
LOCK_TIMEOUT_S = 900


def entry_dir(cache_dir: Path, fields: Mapping) -> Path:
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{fields['backbone']}-{fields['input_size']}-{digest}"


def verified(folder: Path, fields: Mapping) -> bool:
    """Whether ``folder`` is a complete entry for ``fields`` whose files hash as recorded."""
    try:
        entry = json.loads((folder / ENTRY_FILE).read_text())
        return entry["fields"] == json.loads(json.dumps(dict(fields))) and bool(entry["files"]) \
            and all(hash_file(folder / name) == sha for name, sha in entry["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def cached(cache_dir: Path, fields: Mapping, write: Callable[[Path], None]) -> tuple[Path, bool]:
    """The verified entry for ``fields``, built by ``write(folder)`` when missing or corrupt.

    Returns ``(folder, hit)``; ``hit`` is False when the entry was (re)built.
    """
    folder = entry_dir(cache_dir, fields)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(folder) + ".lock", timeout=LOCK_TIMEOUT_S):
        if verified(folder, fields):
            return folder, True
        tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write(tmp)
        files = {p.name: hash_file(p) for p in sorted(tmp.iterdir())}
        atomic_write_text(tmp / ENTRY_FILE, json.dumps({"fields": dict(fields), "files": files},
                                                       indent=2, sort_keys=True))
        if folder.exists():  # an entry that failed its check: ours (named by our hash)
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    return folder, False
