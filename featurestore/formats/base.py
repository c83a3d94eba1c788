"""Base classes shared by the table formats."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from featurestore._io import TMP_PREFIX
from featurestore.lineage import Lineage
from featurestore.rows import Rows

_PART_RE = re.compile(r"^part-(\d{6,})\.")

#: Attribute / schema-metadata names under which every file records what it is.
LINEAGE_ATTR = "featurestore.lineage"
KEY_ATTR = "featurestore.key"
VERSION_ATTR = "featurestore.format_version"
FORMAT_VERSION = "1"


def part_name(seq: int, suffix: str) -> str:
    """Zero-padded part file name, so a plain listing sorts in commit order."""
    return f"part-{seq:06d}{suffix}"


def part_seq(name: str) -> int | None:
    """The sequence number in a part file name, or ``None`` if it is not a part."""
    m = _PART_RE.match(name)
    return int(m.group(1)) if m else None


class Segment:
    """A contiguous run of committed rows in one file, read lazily.

    Subclasses hold an open handle so a file deleted after the snapshot (a
    concurrent consolidation) stays readable until the reader closes.
    """

    name: str
    n_rows: int
    n_features: int

    def read_meta(self, columns=None) -> dict[str, np.ndarray]:
        """Metadata columns (all of :data:`META_COLUMNS` by default) as ``(n_rows,)`` arrays."""
        raise NotImplementedError

    def read_features_into(self, out: np.ndarray, start: int, stop: int) -> None:
        """Copy feature rows ``[start, stop)`` into ``out`` of shape ``(stop - start, d)``."""
        raise NotImplementedError

    def read_features(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = self.n_rows if stop is None else stop
        out = np.empty((stop - start, self.n_features), dtype=np.float32)
        self.read_features_into(out, start, stop)
        return out

    def read_file_lineage(self) -> Lineage:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TableFormat:
    """One way to lay a table out on disk (see the module docstring)."""

    name: str
    suffix: str

    def write_part(self, path: Path, rows: Rows, lineage: Lineage) -> None:
        """Write ``rows`` as one complete part file at ``path`` (the caller makes it atomic)."""
        raise NotImplementedError

    def open_segment(self, path: Path) -> Segment:
        """One file of this format, opened for reading."""
        raise NotImplementedError

    def read_part(self, path: Path) -> Rows:
        """All rows of one part file."""
        seg = self.open_segment(path)
        try:
            return Rows(features=seg.read_features(), **seg.read_meta())
        finally:
            seg.close()

    def part_paths(self, directory: Path) -> list[Path]:
        """Committed part files in ``directory``, in sequence order."""
        if not directory.is_dir():
            return []
        parts = [p for p in directory.iterdir()
                 if not p.name.startswith(TMP_PREFIX) and p.name.endswith(self.suffix)
                 and part_seq(p.name) is not None]
        return sorted(parts, key=lambda p: part_seq(p.name))

    def committed_seqs(self, directory: Path) -> set[int]:
        """Sequence numbers of every part committed to this format's folder."""
        return {part_seq(p.name) for p in self.part_paths(directory)}

    def open_segments(self, directory: Path) -> list[Segment]:
        """A consistent snapshot of the committed rows, in commit order."""
        raise NotImplementedError

    def absorbed_rows(self, directory: Path, seq: int) -> Rows | None:
        """Rows that part ``seq`` left in the single-file form after its part file went.

        ``None`` when the part was never folded in, or the format has no single-file form.
        """
        return None

    def consolidate(self, directory: Path, lineage: Lineage) -> None:
        """Fold committed parts into the format's single-file form, if it has one."""

    def cleanup(self, directory: Path) -> None:
        """Remove leftovers of killed writers (called under the table lock)."""
