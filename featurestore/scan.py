"""Scan a dataset folder into a :class:`~featurestore.manifest.Manifest`.

The scan walks the folder (:mod:`featurestore.layout`), hashes and validates the
files that are new or changed since the last scan, records every skipped entry
with its reason, marks vanished files as missing and, in the class-folders
layout, gives new images a split (:mod:`featurestore.splits`). Files whose
``(path, size_bytes, mtime_ns)`` match the manifest are not read again, so a
rescan of a grown folder costs one ``stat`` per old file.

Writes are committed in batches of :data:`BATCH_SIZE` files, each batch atomic,
so a scan killed midway loses at most one batch of hashing work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import filelock
import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from featurestore._io import HASH_BLOCK_BYTES, hash_file, utc_now  # noqa: F401 (re-exported)
from featurestore.errors import ScanError
from featurestore.layout import CLASS_FOLDERS, IMAGE_EXTENSIONS, Candidate, Rejection, display, walk_dataset
from featurestore.manifest import Manifest
from featurestore.splits import assign_splits, split_targets

BATCH_SIZE = 256
_SUMMARY_LIST_LIMIT = 20


@dataclass(frozen=True)
class Conflict:
    """The same bytes (one ``image_id``) found at several paths."""

    image_id: str
    labels: tuple[str, ...]
    splits: tuple[str, ...]
    paths: tuple[str, ...]


@dataclass
class ScanResult:
    """What one :func:`scan_dataset` call did, and the state of the manifest after it."""

    root: Path
    """Absolute, resolved dataset root."""
    layout: str
    """``split-folders`` or ``class-folders``."""
    added: int = 0
    """Files new to the manifest."""
    unchanged: int = 0
    """Files already known with the same content (not re-hashed when size and mtime match)."""
    modified: int = 0
    """Known paths whose content changed; they keep their split."""
    missing: int = 0
    """Known files not found by this scan (now flagged ``missing``)."""
    rejected: list[tuple[str, str]] = field(default_factory=list)
    """``(path, reason)`` of every entry that was not scanned."""
    label_conflicts: list[Conflict] = field(default_factory=list)
    """Content found under two or more labels."""
    leakage: list[Conflict] = field(default_factory=list)
    """Content found in two or more splits."""
    empty_class_dirs: list[str] = field(default_factory=list)
    """Class folders (relative paths) without a single accepted image."""
    format_mismatches: list[tuple[str, str]] = field(default_factory=list)
    """``(path, true format)`` of images whose extension announces another format."""
    counts: pd.DataFrame = field(default_factory=pd.DataFrame)
    """Present images per split and label, as :meth:`Manifest.counts`."""

    def summary(self) -> str:
        """Readable multi-line report: changes, images per class and split, problems found."""
        lines = [
            f"Dataset {display(os.fsencode(self.root))} (layout: {self.layout})",
            f"Images: {int(self.counts.to_numpy().sum())} present; this scan: {self.added} added, "
            f"{self.unchanged} unchanged, {self.modified} modified, {self.missing} newly missing",
        ]
        if len(self.counts.columns):
            table = self.counts.T.copy()
            table["total"] = table.sum(axis=1)
            table.loc["total"] = table.sum(axis=0)
            lines += ["", "Images per class and split:", table.to_string()]
        sections = [
            ("Rejected entries", [f"{path}: {reason}" for path, reason in self.rejected]),
            ("Label conflicts (same bytes under several labels)", [_describe(c) for c in self.label_conflicts]),
            ("Leakage (same bytes in several splits)", [_describe(c) for c in self.leakage]),
            ("Empty class folders", self.empty_class_dirs),
            ("Extension does not match the format", [f"{path}: {fmt}" for path, fmt in self.format_mismatches]),
        ]
        for title, items in sections:
            if items:
                lines += ["", f"{title}: {len(items)}"] + [f"  {item}" for item in items[:_SUMMARY_LIST_LIMIT]]
                if len(items) > _SUMMARY_LIST_LIMIT:
                    lines.append(f"  ... {len(items) - _SUMMARY_LIST_LIMIT} more; see the manifest")
        return "\n".join(lines)


def scan_dataset(
    root: str | os.PathLike,
    manifest: Manifest | str | os.PathLike,
    *,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    progress: bool = True,
) -> ScanResult:
    """Scan the image folder ``root`` into ``manifest`` and return what changed.

    Parameters
    ----------
    root : path
        ``ROOT/<split>/<class>/<image>`` or ``ROOT/<class>/<image>``.
    manifest : Manifest or path
        An open manifest, or the path of its SQLite file (created if needed).
    seed, val_fraction, test_fraction
        Placement of new images in the class-folders layout; ignored when the
        folders name the splits. ``train`` gets ``1 - val_fraction - test_fraction``.
    progress : bool
        Show a progress bar over the files.

    Raises
    ------
    ScanError
        ``root`` is missing, not a folder, holds no image, mixes layouts, or
        differs from the root already recorded in the manifest.
    ValueError
        The fractions are outside [0, 1) or leave nothing for train.
    """
    targets = split_targets(val_fraction, test_fraction)
    root = _resolve_root(root)
    if not isinstance(manifest, Manifest):
        with Manifest(manifest, create=True) as opened:
            return scan_dataset(root, opened, seed=seed, val_fraction=val_fraction,
                                test_fraction=test_fraction, progress=progress)  # fmt: skip
    lock = filelock.FileLock(f"{manifest.path}.lock", timeout=0)
    try:
        with lock:
            return _scan_locked(root, manifest, targets, seed, progress)
    except filelock.Timeout as err:
        raise ScanError(f"Another scan is writing manifest {manifest.path} (lock file {lock.lock_file}).") from err


def _scan_locked(root: Path, manifest: Manifest, targets: dict, seed: int, progress: bool) -> ScanResult:
    _check_same_root(manifest, root)
    tree = walk_dataset(root)
    if tree.layout == CLASS_FOLDERS:
        _check_same_split_settings(manifest, targets, seed)
    if not tree.candidates:
        hint = _rejected_hint(tree.rejections)
        raise ScanError(f"No image files under dataset root {display(os.fsencode(root))} {hint}")
    settings = {"root": str(root), "layout": tree.layout}
    if tree.layout == CLASS_FOLDERS:
        settings.update(seed=seed, val_fraction=targets["val"], test_fraction=targets["test"])
    result = ScanResult(root=root, layout=tree.layout)
    accepted, rejections = _ingest(tree.candidates, manifest, root, settings, result, progress)
    rejections = tree.rejections + rejections
    if not accepted:
        raise ScanError(f"No valid image under dataset root {display(os.fsencode(root))} " + _rejected_hint(rejections))
    with manifest.transaction():
        result.missing = manifest.set_missing(set(manifest.known_files()) - accepted, missing=True)
        if tree.layout == CLASS_FOLDERS:
            _place_pending(manifest, targets, seed)
        manifest.replace_rejected((r.path, r.raw_path, r.reason, r.size_bytes) for r in rejections)
        manifest.set_meta(**settings, last_scan_at=utc_now())
    used_dirs = {candidate.class_dir for candidate in tree.candidates if candidate.path in accepted}
    result.empty_class_dirs = sorted(set(tree.class_dirs) - used_dirs)
    _fill_report(result, manifest, rejections)
    return result


def _ingest(candidates, manifest: Manifest, root: Path, settings: dict, result: ScanResult, progress: bool):
    """Hash and validate new or changed files, writing one transaction per batch.

    Returns the set of accepted paths and the list of files rejected on reading.
    """
    known = manifest.known_files()
    root_b = os.fsencode(root)
    accepted: set[str] = set()
    rejections = []
    files = iter(tqdm(candidates, desc="scan", unit="file", disable=not progress))
    while batch := list(islice(files, BATCH_SIZE)):
        rows, restored = [], []
        for candidate in batch:
            old = known.get(candidate.path)
            if old is not None and old[:2] == (candidate.size_bytes, candidate.mtime_ns):
                result.unchanged += 1
                accepted.add(candidate.path)
                if old[3]:
                    restored.append(candidate.path)
                continue
            try:
                row = _read_image(root_b, candidate)
            except _Rejected as rejected:
                rejections.append(rejected.rejection)
                continue
            accepted.add(candidate.path)
            rows.append(row)
            if old is None:
                result.added += 1
            elif old[2] != row["image_id"]:
                result.modified += 1
            else:  # touched or copied over with the same bytes
                result.unchanged += 1
        if rows or restored:
            with manifest.transaction():
                manifest.set_meta(**settings)
                manifest.upsert_images(rows)
                manifest.set_missing(restored, missing=False)
    return accepted, rejections


class _Rejected(Exception):
    """A candidate file turned out not to be a usable image."""

    def __init__(self, candidate: Candidate, reason: str):
        super().__init__(reason)
        self.rejection = Rejection(candidate.raw_path, candidate.path, reason, candidate.size_bytes)


def inspect_image(path: str | bytes | os.PathLike) -> tuple[int, int, str, str]:
    """``(width, height, mode, format)`` read from the image header by Pillow, without decoding pixels.

    Raises the Pillow error (``UnidentifiedImageError``, ``OSError``, ...) when
    the file is not an image Pillow can identify.
    """
    with open(path, "rb") as file, Image.open(file) as image:
        return image.width, image.height, image.mode, image.format


def _read_image(root_b: bytes, candidate: Candidate) -> dict:
    """Image row for ``candidate``; raises :class:`_Rejected` for empty, unreadable or non-image files."""
    path = os.path.join(root_b, candidate.raw_path)
    expected = IMAGE_EXTENSIONS[os.path.splitext(candidate.path)[1].lower()]
    if candidate.size_bytes == 0:
        raise _Rejected(candidate, "empty file")
    try:
        width, height, mode, fmt = inspect_image(path)
    except UnidentifiedImageError:
        raise _Rejected(candidate, f"not a valid {expected} image: Pillow cannot identify the format") from None
    except PermissionError as err:
        raise _Rejected(candidate, f"cannot read file: {err.strerror}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        # Pillow reports corrupt headers with any of these.
        raise _Rejected(candidate, f"not a valid {expected} image: {err}") from None
    try:
        image_id = hash_file(path)
    except OSError as err:
        raise _Rejected(candidate, f"cannot read file: {err.strerror}") from None
    return {
        "path": candidate.path, "raw_path": candidate.raw_path, "image_id": image_id,
        "label": candidate.label, "split": candidate.split, "size_bytes": candidate.size_bytes,
        "mtime_ns": candidate.mtime_ns, "width": width, "height": height, "mode": mode,
        "format": fmt, "missing": 0, "added_at": utc_now(),
    }  # fmt: skip


def _place_pending(manifest: Manifest, targets: dict, seed: int) -> None:
    pending, assigned, known, pending_paths = manifest.split_state()
    placed = assign_splits(pending, assigned, known, targets, seed)
    manifest.set_splits((path, placed[image_id]) for image_id, paths in pending_paths.items() for path in paths)


def _fill_report(result: ScanResult, manifest: Manifest, rejections: list[Rejection]) -> None:
    result.rejected = sorted((r.path, r.reason) for r in rejections)
    conflicts = manifest.conflicts()
    for kind, target in (("label_conflict", result.label_conflicts), ("leakage", result.leakage)):
        for row in conflicts[conflicts["kind"] == kind].itertuples():
            target.append(Conflict(row.image_id, tuple(row.labels), tuple(row.splits), tuple(row.paths)))
    images = manifest.images()
    for path, fmt in zip(images["path"], images["format"]):
        if IMAGE_EXTENSIONS[os.path.splitext(path)[1].lower()] != fmt:
            result.format_mismatches.append((path, fmt))
    result.counts = manifest.counts()


def _resolve_root(root) -> Path:
    path = Path(root)
    if not path.exists():
        raise ScanError(f"Dataset root {display(os.fsencode(path))} does not exist.")
    if not path.is_dir():
        raise ScanError(f"Dataset root {display(os.fsencode(path))} is not a directory.")
    return path.resolve()


def _check_same_root(manifest: Manifest, root: Path) -> None:
    recorded = manifest.root
    if recorded is not None and recorded != root:
        raise ScanError(
            f"Manifest {manifest.path} describes dataset root {display(os.fsencode(recorded))}, "
            f"not {display(os.fsencode(root))}; use another store for another dataset."
        )


def _check_same_split_settings(manifest: Manifest, targets: dict, seed: int) -> None:
    # Re-running with another seed cannot re-split the images already placed; say so instead of ignoring it.
    if manifest.get_meta("layout") != CLASS_FOLDERS:
        return
    recorded = {name: manifest.get_meta(name) for name in ("seed", "val_fraction", "test_fraction")}
    given = {"seed": seed, "val_fraction": targets["val"], "test_fraction": targets["test"]}
    if recorded != given:
        raise ScanError(
            f"Manifest {manifest.path} was split with {_settings(recorded)}; got {_settings(given)}. "
            "Splits already assigned never change: rescan with the recorded settings, or use a new store."
        )


def _settings(values: dict) -> str:
    return ", ".join(f"{name}={value}" for name, value in values.items())


def _describe(conflict: Conflict) -> str:
    return (
        f"{conflict.image_id[:12]} labels {', '.join(conflict.labels)}; splits {', '.join(conflict.splits)}: "
        + ", ".join(conflict.paths)
    )


def _rejected_hint(rejections) -> str:
    if not rejections:
        return f"(expected files ending in {', '.join(IMAGE_EXTENSIONS)})."
    shown = "; ".join(f"{r.path}: {r.reason}" for r in rejections[:3])
    return f"({len(rejections)} entries rejected, e.g. {shown})."
