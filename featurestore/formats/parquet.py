"""Parquet: one file per committed part, readable by ``pandas.read_parquet(folder)``.

Column layout, chosen by measurement (``benchmarks/bench_tables.py``): the
metadata columns as plain strings plus one ``features`` column of type
``fixed_size_list<float32>[n_features]``. One column per feature wrote ~4x
slower and took ~47% more disk in the issue's test, and analysts get the matrix
back with ``numpy.stack(df.features)``; :meth:`TableReader.to_pandas` with
``wide=True`` gives one column per feature when that is wanted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from featurestore._io import remove_tmp_files
from featurestore.errors import CorruptTableError
from featurestore.formats.base import (FORMAT_VERSION, KEY_ATTR, LINEAGE_ATTR, VERSION_ATTR,
                                       Segment, TableFormat)
from featurestore.lineage import Lineage
from featurestore.rows import META_COLUMNS, Rows

_ROW_GROUP_ROWS = 4096
_PAGE_BYTES = 16 << 20
# Float features barely compress; skipping the codec keeps writes and reads at
# memory speed, while the repetitive string columns still shrink with snappy.
_COMPRESSION = {"features": "none", **{c: "snappy" for c in META_COLUMNS}}


def _to_arrow(rows: Rows, lineage: Lineage) -> pa.Table:
    flat = pa.array(rows.features.reshape(-1), type=pa.float32())
    columns = {name: pa.array(getattr(rows, name), type=pa.string())
               for name in META_COLUMNS if name != "aug_id"}
    columns["aug_id"] = pa.array(rows.aug_id, type=pa.int32())
    columns["features"] = pa.FixedSizeListArray.from_arrays(flat, rows.n_features)
    table = pa.table({name: columns[name] for name in META_COLUMNS + ("features",)})
    return table.replace_schema_metadata({
        LINEAGE_ATTR: lineage.to_json(), KEY_ATTR: lineage.key, VERSION_ATTR: FORMAT_VERSION})


def _features_to_numpy(column: pa.ChunkedArray | pa.Array, out: np.ndarray) -> None:
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    offset = 0
    for chunk in chunks:
        n = len(chunk)
        out[offset: offset + n] = chunk.flatten().to_numpy().reshape(n, -1)
        offset += n


class ParquetSegment(Segment):
    def __init__(self, path: Path):
        self.path = Path(path)
        self.name = self.path.name
        self._handle = open(self.path, "rb")
        try:
            self._file = pq.ParquetFile(self._handle)
        except (pa.ArrowInvalid, OSError) as err:
            self._handle.close()
            raise CorruptTableError(f"Cannot read Parquet table file {path}: {err}") from err
        meta = self._file.metadata
        self.n_rows = meta.num_rows
        self.n_features = self._file.schema_arrow.field("features").type.list_size
        self._group_starts = np.cumsum([0] + [meta.row_group(i).num_rows
                                              for i in range(meta.num_row_groups)])

    def read_meta(self, columns=None) -> dict[str, np.ndarray]:
        columns = list(columns or META_COLUMNS)
        table = self._file.read(columns=columns)
        return {name: table.column(name).to_numpy().astype(
            np.int32 if name == "aug_id" else str) for name in columns}

    def read_features_into(self, out: np.ndarray, start: int, stop: int) -> None:
        if start == 0 and stop == self.n_rows:
            _features_to_numpy(self._file.read(columns=["features"]).column("features"), out)
            return
        starts = self._group_starts
        first = int(np.searchsorted(starts, start, side="right")) - 1
        for group in range(max(first, 0), len(starts) - 1):
            g0, g1 = int(starts[group]), int(starts[group + 1])
            if g0 >= stop:
                break
            lo, hi = max(start, g0), min(stop, g1)
            col = self._file.read_row_group(group, columns=["features"]).column("features")
            if lo == g0 and hi == g1:
                _features_to_numpy(col, out[lo - start: hi - start])
            else:
                _features_to_numpy(col.slice(lo - g0, hi - lo), out[lo - start: hi - start])

    def read_file_lineage(self) -> Lineage:
        return Lineage.from_json(self._file.schema_arrow.metadata[LINEAGE_ATTR.encode()].decode())

    def close(self) -> None:
        self._handle.close()


class ParquetFormat(TableFormat):
    name = "parquet"
    suffix = ".parquet"

    def write_part(self, path: Path, rows: Rows, lineage: Lineage) -> None:
        # Large v2 data pages decode the nested features column ~4x faster than
        # the 1 MiB v1 default (measured in benchmarks/bench_tables.py).
        pq.write_table(_to_arrow(rows, lineage), path, compression=_COMPRESSION,
                       row_group_size=_ROW_GROUP_ROWS, use_dictionary=["label", "split"],
                       data_page_version="2.0", data_page_size=_PAGE_BYTES)

    def open_segment(self, path: Path) -> Segment:
        return ParquetSegment(path)

    def open_segments(self, directory: Path) -> list[Segment]:
        # Parquet parts are only ever deleted under the writer lock when they were
        # orphans of a killed two-format write, so a plain listing is a snapshot.
        return [ParquetSegment(p) for p in self.part_paths(directory)]

    def cleanup(self, directory: Path) -> None:
        remove_tmp_files(directory)
