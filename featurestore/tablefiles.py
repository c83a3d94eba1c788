"""The files of one table directory: lineage, formats, committed parts.

Helpers shared by the writer, the commit step and the reader; see
:mod:`featurestore.writer` for the directory layout.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from featurestore._io import atomic_write, atomic_write_text
from featurestore.errors import FeatureStoreError, LineageMismatchError
from featurestore.formats import FORMATS, get_format
from featurestore.formats.base import part_name
from featurestore.lineage import Lineage
from featurestore.paths import LINEAGE_FILE, PENDING_DIR  # noqa: F401  (PENDING_DIR re-exported)
from featurestore.rows import Rows


def read_table_lineage(table_dir: Path) -> Lineage:
    """The lineage recorded in a table directory."""
    path = Path(table_dir) / LINEAGE_FILE
    try:
        return Lineage.from_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise FeatureStoreError(f"{table_dir} is not a feature table: {LINEAGE_FILE} is missing.") \
            from err
    except (ValueError, TypeError) as err:
        raise FeatureStoreError(f"Cannot parse {path}: {err}") from err


def table_formats(table_dir: Path) -> list[str]:
    """Formats that hold data in a table directory, in registry order."""
    return [name for name in FORMATS if (Path(table_dir) / name).is_dir()]


def ensure_table_dir(table_dir: Path, lineage: Lineage) -> None:
    """Create ``table_dir`` for ``lineage``, or check that it belongs to ``lineage``."""
    table_dir.mkdir(parents=True, exist_ok=True)
    path = table_dir / LINEAGE_FILE
    if not path.exists():
        atomic_write_text(path, json.dumps(lineage.to_dict(), indent=2, sort_keys=True))
        return
    existing = read_table_lineage(table_dir)
    if existing != lineage:
        fields = ", ".join(f"{k}: table has {a!r}, writer has {b!r}"
                           for k, (a, b) in existing.diff(lineage).items())
        raise LineageMismatchError(f"Table {table_dir} holds another recipe ({fields}).")


def write_part(data_dir: Path, formats: Iterable[str], seq: int, rows: Rows,
               lineage: Lineage) -> None:
    """Commit ``rows`` as part ``seq`` in every format, each file atomically."""
    for name in formats:
        fmt = get_format(name)
        atomic_write(data_dir / name / part_name(seq, fmt.suffix),
                     lambda tmp, fmt=fmt: fmt.write_part(tmp, rows, lineage))


def next_seq(data_dir: Path, formats: Iterable[str]) -> int:
    seqs = set().union(*(get_format(f).committed_seqs(data_dir / f) for f in formats))
    return max(seqs, default=0) + 1


def read_committed_part(data_dir: Path, formats: Iterable[str], seq: int) -> Rows:
    """The rows of part ``seq`` from whichever format still holds them."""
    for name in formats:
        fmt = get_format(name)
        path = data_dir / name / part_name(seq, fmt.suffix)
        if path.exists():
            return fmt.read_part(path)
        rows = fmt.absorbed_rows(data_dir / name, seq)
        if rows is not None:
            return rows
    raise FeatureStoreError(f"Part {seq} of {data_dir} is in none of the formats {list(formats)}.")


def reconcile_formats(data_dir: Path, formats: Sequence[str], lineage: Lineage) -> int:
    """Copy parts that one format has and another lacks; returns parts copied.

    Happens after a kill between the formats' writes of one part, or when a
    format is added to an existing table (a full backfill). Call under the lock.
    """
    seqs = {name: get_format(name).committed_seqs(data_dir / name) for name in formats}
    copied = 0
    for seq in sorted(set().union(*seqs.values())):
        missing = [name for name in formats if seq not in seqs[name]]
        if missing:
            rows = read_committed_part(data_dir, formats, seq)
            write_part(data_dir, missing, seq, rows, lineage)
            copied += 1
    return copied


def committed_keys(data_dir: Path) -> set[tuple[str, int]]:
    """Keys of every committed row under ``data_dir`` (a table or a pending folder)."""
    formats = table_formats(data_dir)
    if not formats:
        return set()
    fmt = get_format(formats[0])
    keys: set[tuple[str, int]] = set()
    for seg in fmt.open_segments(data_dir / formats[0]):
        try:
            meta = seg.read_meta()
            keys.update(zip(meta["image_id"].tolist(), meta["aug_id"].tolist()))
        finally:
            seg.close()
    return keys


def committed_n_features(data_dir: Path, formats: Sequence[str]) -> int | None:
    for name in formats:
        segments = get_format(name).open_segments(data_dir / name)
        try:
            if segments:
                return segments[0].n_features
        finally:
            for seg in segments:
                seg.close()
    return None
