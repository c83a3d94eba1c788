"""Find the image files of a dataset folder and say why every other entry is skipped.

Two layouts are recognised:

* ``split-folders``: ``ROOT/<split>/<class>/<image>``, where every top-level folder
  is a split name (``train``, ``val``/``valid``/``validation``, ``test``, any case);
* ``class-folders``: ``ROOT/<class>/<image>``; splits are then assigned by
  :mod:`featurestore.splits`.

The walk works on ``bytes`` paths so that file names which are not valid UTF-8
are found, stored and reopened exactly. It never follows a symlinked directory
(its files are scanned at their real location, if that is inside the root) and
refuses any symlink that resolves outside the root. Only cheap metadata
(``stat``) is read here; hashing and image validation happen in
:mod:`featurestore.scan`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from featurestore.errors import ScanError

SPLIT_FOLDERS = "split-folders"
CLASS_FOLDERS = "class-folders"

SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}

#: Image extensions accepted (lower case) and the Pillow format they announce.
IMAGE_EXTENSIONS = {
    ".bmp": "BMP",
    ".jpeg": "JPEG",
    ".jpg": "JPEG",
    ".png": "PNG",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}

_PATTERNS = {SPLIT_FOLDERS: "ROOT/<split>/<class>/<image>", CLASS_FOLDERS: "ROOT/<class>/<image>"}


def display(raw: bytes) -> str:
    """Readable UTF-8 form of a raw file name: bytes that are not UTF-8 appear as ``\\xff``."""
    return raw.decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class Candidate:
    """A file at the right depth with an image extension, not yet validated."""

    raw_path: bytes
    """Exact relative path, ``/``-separated, as ``os.fsencode`` bytes."""
    path: str
    """Displayable relative path (UTF-8, ``backslashreplace``)."""
    label: str
    """Name of the class folder."""
    split: str | None
    """``train``/``val``/``test`` from the folder name, or None in the class-folders layout."""
    class_dir: str
    """Displayable relative path of the class folder."""
    size_bytes: int
    mtime_ns: int


@dataclass(frozen=True)
class Rejection:
    """An entry of the dataset folder that is not scanned, and why."""

    raw_path: bytes
    path: str
    reason: str
    size_bytes: int | None = None


@dataclass
class Tree:
    """What :func:`walk_dataset` found under a root."""

    layout: str
    candidates: list[Candidate] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    class_dirs: list[str] = field(default_factory=list)
    """Displayable relative paths of every class folder, empty or not."""


def detect_layout(root: Path) -> str:
    """Return :data:`SPLIT_FOLDERS` or :data:`CLASS_FOLDERS` from the top-level folders of ``root``.

    Hidden and symlinked folders are ignored (the walk rejects them). Raises
    :class:`ScanError` when split folders and other folders are mixed.
    """
    root_b = os.fsencode(root)
    try:
        entries = _entries(root_b)
    except OSError as err:
        raise ScanError(f"Cannot list dataset root {display(root_b)}: {err.strerror}") from err
    names = [
        entry.name
        for entry in entries
        if entry.is_dir(follow_symlinks=False) and not entry.is_symlink() and not entry.name.startswith(b".")
    ]
    split_dirs = [display(name) for name in names if display(name).lower() in SPLIT_ALIASES]
    other_dirs = [display(name) for name in names if display(name).lower() not in SPLIT_ALIASES]
    if split_dirs and other_dirs:
        raise ScanError(
            f"Dataset root {display(root_b)} mixes split folders ({', '.join(split_dirs)}) with other "
            f"folders ({', '.join(other_dirs)}). Expected either {_PATTERNS[SPLIT_FOLDERS]} with split "
            f"in train, val (or valid/validation), test, or {_PATTERNS[CLASS_FOLDERS]} for every folder."
        )
    return SPLIT_FOLDERS if split_dirs else CLASS_FOLDERS


def walk_dataset(root: Path) -> Tree:
    """List the candidate images and the rejected entries under ``root`` (an existing directory)."""
    root_b = os.fsencode(root)
    tree = Tree(layout=detect_layout(root))
    walker = _Walker(root_b, os.path.realpath(root_b), tree)
    walker.visit(root_b, ())
    return tree


class _Walker:
    """Depth-first walk of one root; fills a :class:`Tree`."""

    def __init__(self, root_b: bytes, real_root: bytes, tree: Tree):
        self.root_b = root_b
        self.real_root = real_root
        self.tree = tree
        # Depth (number of path parts) of a class folder; images sit one level below.
        self.class_depth = 2 if tree.layout == SPLIT_FOLDERS else 1
        self.seen_paths: set[str] = set()

    def visit(self, dir_b: bytes, parts: tuple[bytes, ...]) -> None:
        try:
            entries = _entries(dir_b)
        except OSError as err:
            if not parts:
                raise ScanError(f"Cannot list dataset root {display(dir_b)}: {err.strerror}") from err
            self._reject(b"/".join(parts), f"cannot list folder: {err.strerror}", None)
            return
        for entry in entries:
            rel_parts = parts + (entry.name,)
            raw_path = b"/".join(rel_parts)
            reason = self._symlink_problem(entry) or _hidden_problem(entry)
            if reason:
                self._reject(raw_path, reason, entry)
            elif entry.is_dir():
                if len(rel_parts) == self.class_depth:
                    self.tree.class_dirs.append(display(raw_path))
                self.visit(entry.path, rel_parts)
            elif not entry.is_file():
                self._reject(raw_path, "not a regular file", entry)
            else:
                self._file(entry, rel_parts, raw_path)

    def _file(self, entry: os.DirEntry, rel_parts: tuple[bytes, ...], raw_path: bytes) -> None:
        extension = os.path.splitext(entry.name)[1].decode("utf-8", "backslashreplace").lower()
        path = display(raw_path)
        if len(rel_parts) != self.class_depth + 1:
            if len(rel_parts) == 1:
                where = "directly in the dataset root"
            elif len(rel_parts) < self.class_depth + 1:
                where = "directly in a split folder"
            else:
                where = "nested too deep"
            self._reject(raw_path, f"{where}; expected {_PATTERNS[self.tree.layout]}", entry)
        elif extension not in IMAGE_EXTENSIONS:
            given = f"extension '{extension}'" if extension else "no extension"
            self._reject(raw_path, f"not an image file: {given}, expected one of {', '.join(IMAGE_EXTENSIONS)}", entry)
        elif path in self.seen_paths:
            # Only possible when a real name spells out the backslash escape of another one.
            self._reject(raw_path, "its displayable path collides with another file's", entry)
        else:
            try:
                stat = entry.stat()
            except OSError as err:
                self._reject(raw_path, f"cannot stat file: {err.strerror}", None)
                return
            self.seen_paths.add(path)
            split = SPLIT_ALIASES[display(rel_parts[0]).lower()] if self.tree.layout == SPLIT_FOLDERS else None
            self.tree.candidates.append(
                Candidate(
                    raw_path=raw_path,
                    path=path,
                    label=display(rel_parts[-2]),
                    split=split,
                    class_dir=display(b"/".join(rel_parts[:-1])),
                    size_bytes=stat.st_size,
                    mtime_ns=stat.st_mtime_ns,
                )
            )

    def _symlink_problem(self, entry: os.DirEntry) -> str | None:
        if not entry.is_symlink():
            return None
        target = os.path.realpath(entry.path)
        if not is_within(target, self.real_root):
            return f"symlink escapes dataset root -> {display(target)}"
        if not os.path.exists(target):
            return f"broken symlink -> {display(target)}"
        if entry.is_dir():
            # Following it would scan the same files twice or loop forever.
            where = display(os.path.relpath(target, self.real_root))
            return f"symlinked directory not followed; its files are scanned at {where}"
        return None

    def _reject(self, raw_path: bytes, reason: str, entry: os.DirEntry | None) -> None:
        size = None
        if entry is not None and not entry.is_symlink() and entry.is_file(follow_symlinks=False):
            size = entry.stat(follow_symlinks=False).st_size
        self.tree.rejections.append(Rejection(raw_path, display(raw_path), reason, size))


def is_within(path: bytes, real_root: bytes) -> bool:
    """True when the resolved ``path`` is ``real_root`` or lies below it (both bytes, resolved)."""
    return path == real_root or path.startswith(real_root.rstrip(b"/") + b"/")


def _hidden_problem(entry: os.DirEntry) -> str | None:
    if not entry.name.startswith(b"."):
        return None
    return "hidden directory, not scanned" if entry.is_dir(follow_symlinks=False) else "hidden file"


def _entries(dir_b: bytes) -> list[os.DirEntry]:
    # Sorted so that rejections, progress and tie-breaks do not depend on the filesystem.
    with os.scandir(dir_b) as it:
        return sorted(it, key=lambda entry: entry.name)
