"""Chunked HDF5: parts while writing, one consolidated ``features.h5`` per table.

Appending in place to an HDF5 file is not crash-safe (a kill during a metadata
update can leave the whole file unreadable), so writers commit immutable part
files and :meth:`HDF5Format.consolidate` folds them into a copy of
``features.h5`` that atomically replaces the old one. The consolidated file
records which parts it absorbed, so parts left behind by a kill between the
rename and their deletion are never read twice.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np

from featurestore._io import atomic_write, remove_tmp_files
from featurestore.errors import CorruptTableError
from featurestore.formats.base import (FORMAT_VERSION, KEY_ATTR, LINEAGE_ATTR, VERSION_ATTR,
                                       Segment, TableFormat, part_seq)
from featurestore.lineage import Lineage
from featurestore.rows import META_COLUMNS, Rows

CONSOLIDATED = "features.h5"
_ABSORBED_ATTR = "featurestore.absorbed_parts"
_CHUNK_BYTES = 4 << 20  # ~4 MiB feature chunks: full reads at memcpy speed, cheap batches
_META_CHUNK_ROWS = 4096


def _open(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise
    except OSError as err:
        raise CorruptTableError(f"Cannot read HDF5 table file {path}: {err}") from err


class HDF5Segment(Segment):
    def __init__(self, path: Path):
        self.path = Path(path)
        self.name = self.path.name
        self._file = _open(self.path)
        try:
            self._features = self._file["features"]
        except KeyError as err:
            self._file.close()
            raise CorruptTableError(f"HDF5 table file {path} has no 'features' dataset.") from err
        self.n_rows, self.n_features = self._features.shape

    def read_meta(self, columns=None) -> dict[str, np.ndarray]:
        meta = {}
        for name in columns or META_COLUMNS:
            values = self._file[name][: self.n_rows]
            meta[name] = values if name == "aug_id" else _decode(values)
        return meta

    def read_features_into(self, out: np.ndarray, start: int, stop: int) -> None:
        if stop > start:
            self._features.read_direct(out, np.s_[start:stop], np.s_[0: stop - start])

    def read_file_lineage(self) -> Lineage:
        return Lineage.from_json(self._file.attrs[LINEAGE_ATTR])

    def absorbed(self) -> list[list[int]]:
        return json.loads(self._file.attrs.get(_ABSORBED_ATTR, "[]"))

    def close(self) -> None:
        self._file.close()


def _decode(values: np.ndarray) -> np.ndarray:
    """Fixed-width UTF-8 bytes ``(n,)`` -> str array ``(n,)``; ASCII takes the fast cast."""
    if values.size and values.view(np.uint8).max() >= 0x80:
        return np.char.decode(values, "utf-8")
    return values.astype(str)


def _encode(values: np.ndarray) -> np.ndarray:
    encoded = np.char.encode(np.asarray(values, dtype=str), "utf-8")
    return encoded if encoded.dtype.itemsize else encoded.astype("S1")


def _chunk_rows(n_features: int, n_rows: int | None = None) -> tuple[int, int]:
    """Rows per chunk of the features and of the metadata columns, for a file of about
    ``n_rows`` rows (None: full size, ~4 MiB of features)."""
    # HDF5 allocates whole chunks, so a 32-row part with ~4 MiB chunks took 4.5 MB.
    chunk_rows, meta_rows = max(1, _CHUNK_BYTES // (4 * n_features)), _META_CHUNK_ROWS
    if n_rows is not None:
        chunk_rows, meta_rows = max(1, min(chunk_rows, n_rows)), max(1, min(meta_rows, n_rows))
    return chunk_rows, meta_rows


def _capacity(n_rows: int) -> int:
    """Rows a consolidated file is chunked for: the next power of two, so a growing table
    is re-chunked only a few times before its chunks reach full size."""
    return 1 << max(0, n_rows - 1).bit_length()


def _create_datasets(f: h5py.File, n_features: int, lineage: Lineage,
                     n_rows: int | None = None) -> None:
    """Empty datasets, chunked for a file of about ``n_rows`` rows (see :func:`_chunk_rows`)."""
    chunk_rows, meta_rows = _chunk_rows(n_features, n_rows)
    f.create_dataset("features", shape=(0, n_features), maxshape=(None, n_features),
                     dtype=np.float32, chunks=(chunk_rows, n_features))
    for name in META_COLUMNS:
        dtype = np.int32 if name == "aug_id" else "S1"
        f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(meta_rows,))
    f.attrs[LINEAGE_ATTR] = lineage.to_json()
    f.attrs[KEY_ATTR] = lineage.key
    f.attrs[VERSION_ATTR] = FORMAT_VERSION


def _widen(f: h5py.File, name: str, itemsize: int) -> None:
    # String columns are fixed-width UTF-8: h5py reads them ~20x faster than
    # variable-length strings. A longer value makes the column wider, rewriting
    # only that (small) column of the file being built.
    old, chunks = f[name][...], f[name].chunks
    del f[name]
    f.create_dataset(name, data=old.astype(f"S{itemsize}"), maxshape=(None,), chunks=chunks)


def _append(f: h5py.File, columns) -> tuple[int, int]:
    """Append ``columns`` (a Rows, or an open part file) to ``f``; returns the row range."""
    raw = isinstance(columns, h5py.File)
    start = f["features"].shape[0]
    stop = start + (columns["features"].shape[0] if raw else len(columns))
    for name in ("features",) + META_COLUMNS:
        values = columns[name][...] if raw else getattr(columns, name)
        if name not in ("features", "aug_id"):
            if not raw:
                values = _encode(values)
            if values.dtype.itemsize > f[name].dtype.itemsize:
                _widen(f, name, values.dtype.itemsize)
        ds = f[name]
        ds.resize(stop, axis=0)
        ds[start:stop] = values
    return start, stop


def _consolidated_copy(target: Path, tmp: Path, pending: list[Path],
                       lineage: Lineage) -> h5py.File:
    """``tmp`` opened for appending ``pending``, holding ``target``'s rows (if any).

    Its chunks fit the rows it will hold: a copy of ``target`` while its chunks
    are big enough, else a re-chunked rewrite (only while ``target`` is smaller
    than one full chunk, so cheap); a table past one full chunk reads as before.
    """
    rows = 0
    for part in pending:
        with _open(part) as source:
            rows, n_features = rows + source["features"].shape[0], source["features"].shape[1]
    if target.exists():
        with _open(target) as old:
            rows += old["features"].shape[0]
            have = old["features"].chunks[0]
        if have >= _chunk_rows(n_features, rows)[0]:
            shutil.copyfile(target, tmp)
            return h5py.File(tmp, "a")
    f = h5py.File(tmp, "w")
    try:
        _create_datasets(f, n_features, lineage, n_rows=_capacity(rows))
        if target.exists():
            with _open(target) as old:  # first, so every absorbed row range stays valid
                _append(f, old)
    except BaseException:
        f.close()
        raise
    return f


def _check_free_space(directory: Path, files: list[Path]) -> None:
    """Refuse with ENOSPC, before HDF5 writes a byte, a consolidation the disk cannot hold.

    HDF5 does not survive a failed write: a full disk in the middle of a
    consolidation segfaulted the process. The estimate is generous (whole
    ~4 MiB feature chunks, plus what the files hold now); the parts stay
    readable when it refuses, and a rerun with more space consolidates.
    """
    n_rows = n_features = 0
    for path in files:
        if path.exists():
            with _open(path) as f:
                n_rows += f["features"].shape[0]
                n_features = f["features"].shape[1]
    if not n_features:
        return
    chunk_rows = max(1, _CHUNK_BYTES // (4 * n_features))
    chunked = -(-n_rows // chunk_rows) * chunk_rows * n_features * 4
    needed = max(chunked, sum(p.stat().st_size for p in files if p.exists())) * 1.1 + (1 << 20)
    stat = os.statvfs(directory)
    free = stat.f_bavail * stat.f_frsize
    if free < needed:
        raise OSError(errno.ENOSPC, f"No space left on device: consolidating {n_rows} rows "
                                    f"needs about {needed / 2**20:.1f} MiB, "
                                    f"{free / 2**20:.1f} MiB free", str(directory / CONSOLIDATED))


class HDF5Format(TableFormat):
    name = "hdf5"
    suffix = ".h5"

    def write_part(self, path: Path, rows: Rows, lineage: Lineage) -> None:
        # Built in memory (a part is at most rows_per_part rows), then written in one
        # go: HDF5 does not survive a failed write (a full disk segfaulted h5py while
        # it flushed), while Python's own write raises a plain OSError (ENOSPC).
        buffer = io.BytesIO()
        with h5py.File(buffer, "w") as f:
            _create_datasets(f, rows.n_features, lineage, n_rows=len(rows))
            _append(f, rows)
        path.write_bytes(buffer.getbuffer())

    def open_segment(self, path: Path) -> Segment:
        return HDF5Segment(path)

    def _absorbed(self, directory: Path) -> list[list[int]]:
        path = directory / CONSOLIDATED
        if not path.exists():
            return []
        with _open(path) as f:
            return json.loads(f.attrs.get(_ABSORBED_ATTR, "[]"))

    def committed_seqs(self, directory: Path) -> set[int]:
        return super().committed_seqs(directory) | {seq for seq, _, _ in self._absorbed(directory)}

    def absorbed_rows(self, directory: Path, seq: int) -> Rows | None:
        """Rows that part ``seq`` contributed to ``features.h5``, or ``None``."""
        for s, start, stop in self._absorbed(directory):
            if s == seq:
                seg = HDF5Segment(directory / CONSOLIDATED)
                try:
                    meta = {k: v[start:stop] for k, v in seg.read_meta().items()}
                    return Rows(features=seg.read_features(start, stop), **meta)
                finally:
                    seg.close()
        return None

    def open_segments(self, directory: Path) -> list[Segment]:
        # A concurrent consolidation may delete a listed part between listing and
        # opening; the new features.h5 then holds its rows, so take a new snapshot.
        for _ in range(5):
            segments: list[Segment] = []
            try:
                absorbed: set[int] = set()
                path = directory / CONSOLIDATED
                if path.exists():
                    seg = HDF5Segment(path)
                    segments.append(seg)
                    absorbed = {s for s, _, _ in seg.absorbed()}
                for part in self.part_paths(directory):
                    if part_seq(part.name) not in absorbed:
                        segments.append(HDF5Segment(part))
                return segments
            except FileNotFoundError:
                for seg in segments:
                    seg.close()
        raise CorruptTableError(f"HDF5 table in {directory} kept changing while being opened.")

    def consolidate(self, directory: Path, lineage: Lineage) -> None:
        target = directory / CONSOLIDATED
        absorbed = self._absorbed(directory)
        done = {s for s, _, _ in absorbed}
        pending = [p for p in self.part_paths(directory) if part_seq(p.name) not in done]
        if pending:
            _check_free_space(directory, [target, *pending])

            def write(tmp: Path) -> None:
                f = _consolidated_copy(target, tmp, pending, lineage)
                with f:
                    for part in pending:
                        with _open(part) as source:  # raw bytes: no decode/encode round trip
                            start, stop = _append(f, source)
                        absorbed.append([part_seq(part.name), start, stop])
                    f.attrs[_ABSORBED_ATTR] = json.dumps(absorbed)

            atomic_write(target, write)
        self.cleanup(directory)

    def cleanup(self, directory: Path) -> None:
        remove_tmp_files(directory)
        done = {s for s, _, _ in self._absorbed(directory)}
        for part in self.part_paths(directory):
            if part_seq(part.name) in done:
                with contextlib.suppress(FileNotFoundError):
                    part.unlink()
