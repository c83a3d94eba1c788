"""Seeded, stratified and incremental assignment of images to train/val/test.

Why hand-written: scikit-learn's splitters (``train_test_split``,
``StratifiedShuffleSplit``) re-split the whole population on every call, so an
image that was in ``train`` yesterday may land in ``test`` after the folder
grows by one file, silently leaking evaluated images into training. Here images
that already have a split keep it, and only new content is placed, per class,
into whichever split is furthest below its target. The result is deterministic
for a given seed and stays within one image of the target proportions per class
when classes grow from a balanced state.

The unit of assignment is the content (``image_id`` = SHA-256 of the bytes), so
byte-identical copies of an image always share one split.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Mapping

SPLITS = ("train", "val", "test")
#: Split of the images that ``ingest`` received without a label: they are scored and
#: searchable, but training, cross-validation, evaluation and audits read only SPLITS.
INBOX = "inbox"


def split_targets(val_fraction: float, test_fraction: float) -> dict[str, float]:
    """Return the target fraction of each split, ``{'train': ..., 'val': ..., 'test': ...}``.

    ``train`` gets what ``val_fraction`` and ``test_fraction`` leave.
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1); got {value!r}.")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            "val_fraction + test_fraction must be below 1 so that train keeps images; "
            f"got {val_fraction!r} + {test_fraction!r}."
        )
    return {"train": 1.0 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}


def placement_order(image_ids, seed: int) -> list[str]:
    """Sort ``image_ids`` by ``sha256(f"{seed}:{image_id}")``: a seeded shuffle that does not
    depend on the order in which files were found, nor on which other files exist."""
    return sorted(image_ids, key=lambda image_id: hashlib.sha256(f"{seed}:{image_id}".encode()).digest())


def assign_splits(
    pending: Mapping[str, Mapping[str, int]],
    assigned_counts: Mapping[str, Mapping[str, int]],
    known_splits: Mapping[str, str],
    targets: Mapping[str, float],
    seed: int,
) -> dict[str, str]:
    """Choose a split for every pending image content.

    Parameters
    ----------
    pending : mapping label -> {image_id: n_files}
        Content without a split yet, with how many files of that label carry it.
    assigned_counts : mapping label -> {split: n_files}
        Files of each label that already have a split (and are still present).
    known_splits : mapping image_id -> split
        Content already placed somewhere (any label, present or missing): a new copy
        of it goes to the same split so the same bytes never straddle splits.
    targets : mapping split -> fraction, as returned by :func:`split_targets`.
    seed : int
        Seed of the placement order.

    Returns
    -------
    dict image_id -> split, covering every image_id in ``pending``.
    """
    known = dict(known_splits)
    placed: dict[str, str] = {}
    for label in sorted(pending):
        counts = Counter(assigned_counts.get(label, {}))
        new_ids = pending[label]
        fresh = []
        for image_id in new_ids:
            if image_id in known:
                placed[image_id] = known[image_id]
                counts[known[image_id]] += new_ids[image_id]
            else:
                fresh.append(image_id)
        n_after = sum(counts.values()) + sum(new_ids[image_id] for image_id in fresh)
        for image_id in placement_order(fresh, seed):
            split = _largest_deficit(counts, targets, n_after)
            placed[image_id] = known[image_id] = split
            counts[split] += new_ids[image_id]
    return placed


def _largest_deficit(counts: Mapping[str, int], targets: Mapping[str, float], n_after: int) -> str:
    # Ties go to the earlier split in SPLITS so the choice never depends on dict order.
    deficits = [(targets[split] * n_after - counts.get(split, 0), -rank) for rank, split in enumerate(SPLITS)]
    return SPLITS[-max(deficits)[1]]
