"""Parallel decoding into fixed-shape batches, with bounded prefetch.

``iter_batches(tasks, recipe, batch_size=...)`` decodes images on a thread pool
(Pillow, NumPy and SciPy release the GIL while they work) while the caller runs
the model on the previous batch, and yields ``Batch`` objects in task order.

Memory stays bounded whatever the dataset size: at most ``prefetch_batches``
batches' worth of views are decoded ahead, and tasks are pulled lazily from the
input iterable.

Every batch has the same shape ``(batch_size, size, size, 3)``; the last one is
zero-padded. A constant shape means one compiled graph (no retracing on
TensorFlow, no recompilation on JAX) and, since the model always sees the same
batch geometry, a view's features do not depend on which batch it landed in,
which is what makes a resumed run equal an uninterrupted one.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import os
from typing import Iterable, Iterator

import numpy as np

from pipelines.extract.augment import apply_augmentation, params_to_json, view_params
from pipelines.backbones.registry import preprocess
from pipelines.extract.images import (DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image,
                                      read_image_file)


@dataclasses.dataclass(frozen=True)
class ImageTask:
    """One image to decode and the views of it that are still missing."""

    image_id: str
    """SHA-256 of the file's bytes when they were hashed (by the scan, or by predict)."""
    path: str
    """Path as recorded in the manifest (stored in the feature table)."""
    file: str
    """Absolute path to read."""
    label: str
    split: str
    aug_ids: tuple[int, ...]
    size_bytes: int | None = None
    """File size recorded by the scan (named in the reason when the file changed)."""
    hashed_at: str = "scan"
    """When ``image_id`` was computed ("scan"), for the reason of a changed file."""
    rehash_hint: str = "rerun featurestore scan"
    """What the user should do when the bytes no longer hash to ``image_id``."""


@dataclasses.dataclass(frozen=True)
class ViewRecipe:
    """How every view is produced: size, resize, preprocessing, augmentation."""

    size: int
    preprocessing: str
    interpolation: str = "bilinear"
    max_pixels: int = DEFAULT_MAX_PIXELS
    augment_preset: str | None = None
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class ViewRow:
    """Metadata of one extracted view: one feature-table row."""

    image_id: str
    aug_id: int
    label: str
    split: str
    path: str
    aug_params: str


@dataclasses.dataclass
class Batch:
    """``pixels[:len(rows)]`` are the views of ``rows``; the rest is padding."""

    pixels: np.ndarray
    """``(batch_size, size, size, 3)`` float32, preprocessed for the backbone."""
    rows: list[ViewRow]
    errors: list[tuple[str, str, str]]
    """``(path, image_id, reason)`` of files that failed since the previous batch."""


def decode_views(task: ImageTask, recipe: ViewRecipe) -> list[tuple[ViewRow, np.ndarray]]:
    """Decode ``task`` once and build each of its views, preprocessed.

    Returns ``[(row, pixels (size, size, 3) float32), ...]`` in ``aug_ids``
    order; raises ``ImageDecodeError`` when the file cannot be decoded, or when
    the bytes read no longer hash to ``task.image_id``.
    """
    data = read_image_file(task.file)
    _check_unchanged(task, data)
    image = decode_image(
        data, (recipe.size, recipe.size), path=task.path,
        interpolation=recipe.interpolation, max_pixels=recipe.max_pixels,
    )
    views = []
    for aug_id in task.aug_ids:
        params = {} if aug_id == 0 else view_params(
            recipe.augment_preset, recipe.seed, task.image_id, aug_id
        )
        pixels = preprocess(apply_augmentation(image, params), recipe.preprocessing)
        row = ViewRow(task.image_id, aug_id, task.label, task.split, task.path,
                      params_to_json(params))
        views.append((row, pixels))
    return views


def _check_unchanged(task: ImageTask, data: bytes) -> None:
    """Refuse bytes that are not the image ``task.image_id`` names.

    Features are keyed by the id the scan hashed; a file rewritten since then
    (same size or not) would store another image's features under that id. The
    bytes hashed here are the ones decoded, so no later write can slip between.
    The file is reported, not re-keyed: the manifest (path -> id, label, split)
    belongs to the scan, and a rescan records the new image.
    """
    if hashlib.sha256(data).hexdigest() == task.image_id:
        return
    sizes = "same size, other bytes" if task.size_bytes in (None, len(data)) else \
        f"{task.size_bytes} -> {len(data)} bytes"
    raise ImageDecodeError(task.path, f"changed since {task.hashed_at} ({sizes}): its SHA-256 "
                                      f"is no longer {task.image_id[:12]}...; "
                                      f"{task.rehash_hint}")


def default_decode_threads() -> int:
    """Decode threads: one per CPU this process may run on, at least 2."""
    if hasattr(os, "sched_getaffinity"):
        return max(2, len(os.sched_getaffinity(0)))
    return max(2, os.cpu_count() or 1)


def iter_batches(
    tasks: Iterable[ImageTask],
    recipe: ViewRecipe,
    *,
    batch_size: int,
    workers: int | None = None,
    prefetch_batches: int = 2,
) -> Iterator[Batch]:
    """Yield fixed-shape batches of decoded views, in task order.

    Files that fail to decode are reported in the ``errors`` of the next batch
    (a final batch with no rows may carry only errors).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    builder = _BatchBuilder(batch_size, recipe.size)
    max_ahead = prefetch_batches * batch_size
    pool = concurrent.futures.ThreadPoolExecutor(workers or default_decode_threads(), "decode")
    pending: collections.deque = collections.deque()
    task_iter = iter(tasks)
    try:
        _submit(pool, pending, task_iter, recipe, max_ahead)
        while pending:
            task, future = pending.popleft()
            _submit(pool, pending, task_iter, recipe, max_ahead)
            try:
                views = future.result()
            except ImageDecodeError as err:
                builder.errors.append((task.path, task.image_id, err.reason))
                continue
            for row, pixels in views:
                if builder.add(row, pixels):
                    yield builder.take()
        if builder.rows or builder.errors:
            yield builder.take()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _submit(pool, pending, task_iter, recipe, max_ahead) -> None:
    """Top up the queue of decode jobs to ``max_ahead`` views in flight."""
    in_flight = sum(len(task.aug_ids) for task, _ in pending)
    while in_flight < max_ahead:
        task = next(task_iter, None)
        if task is None:
            return
        pending.append((task, pool.submit(decode_views, task, recipe)))
        in_flight += len(task.aug_ids)


class _BatchBuilder:
    """Fills one preallocated batch array; ``take`` hands it over and starts anew."""

    def __init__(self, batch_size: int, size: int):
        self.shape = (batch_size, size, size, 3)
        self._reset()

    def _reset(self) -> None:
        self.pixels = np.zeros(self.shape, dtype=np.float32)
        self.rows: list[ViewRow] = []
        self.errors: list[tuple[str, str, str]] = []

    def add(self, row: ViewRow, pixels: np.ndarray) -> bool:
        """Append one view; True when the batch is full."""
        self.pixels[len(self.rows)] = pixels
        self.rows.append(row)
        return len(self.rows) == self.shape[0]

    def take(self) -> Batch:
        batch = Batch(self.pixels, self.rows, self.errors)
        self._reset()
        return batch
