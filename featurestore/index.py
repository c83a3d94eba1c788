"""Nearest-neighbour indexes kept beside a feature table.

``STORE/tables/<key>/index/<metric>/`` holds ``index.json`` and either
``vectors.npy`` (exact: the prepared feature matrix, memory-mapped at search
time) or ``hnsw.faiss`` (approximate: a faiss HNSW graph). Exact search is the
default and stays exact; HNSW is for tables past :data:`AUTO_HNSW_ROWS` rows,
where a scan of every row per query gets slow. faiss was chosen by measurement
against usearch on 100,000 x 1,024 features (``benchmarks/bench_search.py``
prints the figures): higher recall at the same speed and a faster build.
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featurestore._io import atomic_write, atomic_write_text
from featurestore.errors import FeatureStoreError
from featurestore.paths import INDEX_DIR
from featurestore.reader import TableReader
from featurestore.similarity import Neighbours, check_metric, exact_search, normalize_rows

KINDS = ("exact", "hnsw")
#: ``kind="auto"`` builds an exact index below this many rows, HNSW above.
AUTO_HNSW_ROWS = 1_000_000

_BUILD_BATCH_ROWS = 16384


class IndexStaleError(FeatureStoreError):
    """The table gained rows after its index was built."""


def _faiss():
    try:
        import faiss
    except ImportError as err:
        raise FeatureStoreError(
            "Approximate (HNSW) indexes need faiss: pip install faiss-cpu "
            "(or use kind='exact').") from err
    return faiss


@dataclass
class SimilarityIndex:
    """A built index: search it with :meth:`search`; rows are table row positions."""

    directory: Path
    meta: dict
    _base: np.ndarray | None = None
    _hnsw: object | None = None

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def vectors(self) -> np.ndarray | None:
        """An exact index's prepared rows ``(rows, dimension)``, memory-mapped; None for HNSW."""
        return self._base

    @property
    def metric(self) -> str:
        return self.meta["metric"]

    @property
    def rows(self) -> int:
        return self.meta["rows"]

    @staticmethod
    def path_for(reader: TableReader, metric: str) -> Path:
        return reader.table_dir / INDEX_DIR / check_metric(metric)

    @classmethod
    def build(cls, reader: TableReader, *, metric: str = "cosine", kind: str = "auto",
              hnsw_m: int = 32, ef_construction: int = 80, ef_search: int = 128
              ) -> SimilarityIndex:
        """Build and save the index of ``reader``'s table.

        Rows are streamed in batches, so an exact build holds one batch at a
        time and an HNSW build faiss' own copy of the vectors plus its graph:
        never more than about the table's size on top of one batch.
        """
        check_metric(metric)
        if kind == "auto":
            kind = "hnsw" if len(reader) >= AUTO_HNSW_ROWS else "exact"
        if kind not in KINDS:
            raise FeatureStoreError(f"Unknown index kind {kind!r}. Available: auto, "
                                    f"{', '.join(KINDS)}.")
        if len(reader) == 0:
            raise FeatureStoreError(f"Table {reader.key} has no rows to index.")
        directory = cls.path_for(reader, metric)
        directory.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        meta = {"kind": kind, "metric": metric, "rows": len(reader),
                "dimension": reader.dimension, "table_key": reader.key}
        batches = (_prepared(X, metric) for X, _ in reader.iter_batches(_BUILD_BATCH_ROWS))
        if kind == "exact":
            shape = (len(reader), reader.dimension)
            atomic_write(directory / "vectors.npy", lambda tmp: _stream_npy(tmp, shape, batches))
        else:
            faiss = _faiss()
            space = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
            hnsw = faiss.IndexHNSWFlat(reader.dimension, hnsw_m, space)
            hnsw.hnsw.efConstruction = ef_construction
            for batch in batches:
                hnsw.add(batch)
            atomic_write(directory / "hnsw.faiss", lambda tmp: faiss.write_index(hnsw, str(tmp)))
            meta.update(hnsw_m=hnsw_m, ef_construction=ef_construction, ef_search=ef_search)
        meta["build_seconds"] = round(time.perf_counter() - t0, 3)
        atomic_write_text(directory / "index.json", json.dumps(meta, indent=2))
        return cls.load(reader, metric=metric)

    @classmethod
    def extend(cls, reader: TableReader, *, metric: str = "cosine") -> SimilarityIndex:
        """Add the rows the table gained since the index was saved, without rebuilding it.

        An exact index appends the new prepared rows to ``vectors.npy`` in place and
        rewrites its header; an HNSW index adds them to its graph. ``index.json`` is
        written last, so a kill before it leaves the old index (extra rows past its
        ``rows`` are ignored, then cut by the next extend).
        """
        directory = cls.path_for(reader, metric)
        meta = json.loads((directory / "index.json").read_text())
        if meta["rows"] > len(reader) or meta["table_key"] != reader.key:
            return cls.build(reader, metric=metric, kind=meta["kind"])
        new = _prepared(reader.read_features(np.arange(meta["rows"], len(reader))), metric)
        if meta["kind"] == "exact":
            if not _append_npy(directory / "vectors.npy", meta["rows"], new):
                return cls.build(reader, metric=metric, kind="exact")
        else:
            hnsw = _faiss().read_index(str(directory / "hnsw.faiss"))
            hnsw.add(np.ascontiguousarray(new, dtype=np.float32))
            atomic_write(directory / "hnsw.faiss",
                         lambda tmp: _faiss().write_index(hnsw, str(tmp)))
        meta["rows"] = len(reader)
        atomic_write_text(directory / "index.json", json.dumps(meta, indent=2))
        return cls.load(reader, metric=metric)

    @classmethod
    def load(cls, reader: TableReader, *, metric: str = "cosine") -> SimilarityIndex:
        """Open the saved index; refuses one built before the table grew."""
        directory = cls.path_for(reader, metric)
        try:
            meta = json.loads((directory / "index.json").read_text())
        except FileNotFoundError:
            raise FeatureStoreError(
                f"Table {reader.key} has no {metric} index; build it with `featurestore index "
                f"--table {reader.key} --metric {metric}`.") from None
        if meta["rows"] != len(reader) or meta["table_key"] != reader.key:
            raise IndexStaleError(
                f"The {metric} index of table {reader.key} covers {meta['rows']} rows but the "
                f"table has {len(reader)}; rebuild it with `featurestore index`.")
        index = cls(directory, meta)
        if meta["kind"] == "exact":
            # An extend killed before index.json may have left rows past meta["rows"].
            index._base = np.load(directory / "vectors.npy", mmap_mode="r")[: meta["rows"]]
        else:
            index._hnsw = _faiss().read_index(str(directory / "hnsw.faiss"))
            index._hnsw.hnsw.efSearch = meta["ef_search"]
        return index

    def search(self, queries: np.ndarray, k: int, *, query_groups: np.ndarray | None = None,
               base_groups: np.ndarray | None = None) -> Neighbours:
        """``k`` nearest rows per query; rows of the query's own group are skipped."""
        if self._base is not None:
            return exact_search(queries, self._base, k, metric=self.metric, base_prepared=True,
                                query_groups=query_groups, base_groups=base_groups)
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if self.metric == "cosine":
            queries = normalize_rows(queries)
        slack = 0
        if base_groups is not None:
            slack = int(np.bincount(base_groups[base_groups >= 0]).max(initial=0))
        scores, idx = self._hnsw.search(queries, k + slack)
        idx = idx.astype(np.int64)
        if base_groups is not None:
            own = (idx >= 0) & (base_groups[np.maximum(idx, 0)] == query_groups[:, None])
            idx[own] = -1
        order = np.argsort(idx < 0, axis=1, kind="stable")[:, :k]
        idx = np.take_along_axis(idx, order, axis=1)
        scores = np.take_along_axis(scores, order, axis=1)
        if self.metric == "cosine":
            dist = 1.0 - scores
        else:
            dist = np.sqrt(np.maximum(scores, 0.0))
        dist[idx < 0] = np.inf
        return Neighbours(dist.astype(np.float32), idx)


def _prepared(X: np.ndarray, metric: str) -> np.ndarray:
    return normalize_rows(X, copy=False) if metric == "cosine" else X


def _stream_npy(path: Path, shape: tuple[int, int], batches) -> None:
    """Write a float32 ``.npy`` of ``shape`` from row batches, one batch in memory."""
    with open(path, "wb") as f:
        f.write(_npy_header(shape))
        for batch in batches:
            f.write(memoryview(np.ascontiguousarray(batch, dtype=np.float32)))


def _append_npy(path: Path, rows: int, new: np.ndarray) -> bool:
    """Keep the first ``rows`` rows of the float32 ``.npy`` at ``path``, append ``new``
    and rewrite the shape in its header; False (nothing changed) if the header grows."""
    with open(path, "r+b") as f:
        if np.lib.format.read_magic(f) != (1, 0):
            return False
        shape, _, _ = np.lib.format.read_array_header_1_0(f)
        offset = f.tell()
        header = _npy_header((rows + len(new), shape[1]))
        if len(header) != offset or shape[1] != new.shape[1] or shape[0] < rows:
            return False
        f.truncate(offset + rows * shape[1] * 4)
        f.seek(0, 2)
        f.write(memoryview(np.ascontiguousarray(new, dtype=np.float32)))
        f.flush()
        os.fsync(f.fileno())  # the rows are on disk before the header counts them
        f.seek(0)
        f.write(header)
        f.flush()
        os.fsync(f.fileno())
    return True


def _npy_header(shape: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                 "fortran_order": False, "shape": shape})
    return buffer.getvalue()
