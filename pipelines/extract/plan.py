"""What an extract run must compute: the manifest's images minus the rows already stored.

The plan is a pure function of the manifest, the recipe and the keys already in
the tables, so a rerun after any crash computes exactly the missing
``(image_id, aug_id)`` rows, and ``--shard K/N`` takes the same deterministic
1/N of the images on every machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Iterator

import pandas as pd

from featurestore.store import parse_shard
from pipelines.extract.loader import ImageTask


@dataclasses.dataclass
class Plan:
    """Tasks to run plus the counts the end summary reports."""

    tasks: list[ImageTask]
    images: int
    """Distinct images in this run's share of the manifest."""
    views_total: int
    """Views (rows) this share should have in each table."""
    views_done: int
    """Views already in every table (skipped)."""
    duplicate_paths: int
    """Manifest paths skipped because an earlier path has the same bytes (image_id)."""

    @property
    def views_todo(self) -> int:
        return sum(len(t.aug_ids) for t in self.tasks)


def in_shard(image_id: str, shard: str | None) -> bool:
    """Whether ``image_id`` belongs to shard ``"K/N"`` (always True for None).

    Hashing the id (rather than counting rows) keeps an image in the same shard
    whatever else the manifest holds, on every machine.
    """
    if shard is None:
        return True
    k, n = parse_shard(shard)
    digest = hashlib.sha256(image_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % n == k - 1


def wanted_views(split: str, views: int, augment_splits) -> tuple[int, ...]:
    """aug_ids an image should have: 0 (raw), plus 1..views on augmented splits."""
    if views and split in augment_splits:
        return tuple(range(views + 1))
    return (0,)


def make_plan(images: pd.DataFrame, file_of, existing: list[set], *, views: int,
              augment_splits, shard: str | None) -> Plan:
    """Plan tasks from manifest ``images`` (columns image_id, path, label, split, size_bytes).

    ``file_of(row)`` returns the absolute path to read; ``existing`` holds the
    committed keys of each output table: a view is computed when any table
    lacks it.
    """
    unique = images.drop_duplicates("image_id", keep="first")
    tasks, n_images, total, done = [], 0, 0, 0
    for row in _rows(unique):
        if not in_shard(row["image_id"], shard):
            continue
        n_images += 1
        wanted = wanted_views(row["split"], views, augment_splits)
        missing = tuple(a for a in wanted
                        if any((row["image_id"], a) not in keys for keys in existing))
        total += len(wanted)
        done += len(wanted) - len(missing)
        if missing:
            tasks.append(ImageTask(
                image_id=row["image_id"], path=row["path"], file=str(file_of(row)),
                label=str(row["label"]), split=str(row["split"]), aug_ids=missing,
                size_bytes=int(row["size_bytes"]) if pd.notna(row.get("size_bytes")) else None))
    return Plan(tasks, n_images, total, done, len(images) - len(unique))


def _rows(frame: pd.DataFrame) -> Iterator[dict]:
    for record in frame.to_dict("records"):
        yield record
