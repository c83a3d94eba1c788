"""The commit step: merge the parts of finished part writers (shards) into a table."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Sequence
from pathlib import Path

from featurestore._io import remove_tmp_files
from featurestore.errors import LineageMismatchError, WriterLockedError
from featurestore.formats import DEFAULT_FORMAT, get_format
from featurestore.lineage import Lineage
from featurestore.locking import HeldLock
from featurestore.tablefiles import PENDING_DIR, read_committed_part, table_formats
from featurestore.writer import TableWriter


def commit_pending(table_dir: Path, lineage: Lineage, *, consolidate: bool = True) -> dict:
    """Merge the parts of finished part writers into the table; skip running ones.

    Rows whose key is already committed are dropped (a shard rerun or overlap),
    so the table keeps exactly one row per ``(image_id, aug_id)``.
    Returns ``{"merged": [...], "skipped": {writer: reason}, "rows": n, "duplicates": n}``.
    """
    summary = {"merged": [], "skipped": {}, "rows": 0, "duplicates": 0}
    pending_root = table_dir / PENDING_DIR
    pendings = sorted(p for p in pending_root.glob("*") if p.is_dir())
    formats = table_formats(table_dir) + [f for p in pendings for f in table_formats(p)]
    with TableWriter(table_dir, lineage, list(dict.fromkeys(formats)) or [DEFAULT_FORMAT],
                     consolidate=consolidate) as writer:
        for pending in pendings:
            lock = HeldLock(pending / ".lock", f"Part writer {pending.name!r}")
            try:
                lock.acquire()
            except WriterLockedError as err:
                summary["skipped"][pending.name] = str(err)
                continue
            try:
                formats = table_formats(pending)
                for name in formats:
                    remove_tmp_files(pending / name)
                part_lineages = _pending_lineages(pending, formats)
                for other in part_lineages:
                    if other != lineage:
                        raise LineageMismatchError(
                            f"Pending parts in {pending} were computed with another recipe "
                            f"({other.diff(lineage)}); refusing to merge them into "
                            f"{lineage.key}.")
                all_seqs = set().union(*(get_format(f).committed_seqs(pending / f)
                                         for f in formats))
                for seq in sorted(all_seqs):
                    rows = read_committed_part(pending, formats, seq)
                    keep = ~writer.known(rows.keys())
                    summary["duplicates"] += int((~keep).sum())
                    writer.append_rows(rows.take(keep))
                    writer.flush()
                    summary["rows"] += int(keep.sum())
                summary["merged"].append(pending.name)
                # Delete while still holding the lock, so no part writer of the
                # same name can start writing into a folder that is going away.
                shutil.rmtree(pending)
            finally:
                lock.release()
    with contextlib.suppress(OSError):
        pending_root.rmdir()
    return summary


def _pending_lineages(pending: Path, formats: Sequence[str]) -> list[Lineage]:
    lineages = []
    for name in formats:
        for seg in get_format(name).open_segments(pending / name):
            try:
                lineages.append(seg.read_file_lineage())
            finally:
                seg.close()
    return lineages
