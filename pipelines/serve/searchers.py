"""``featurestore search`` kept open per table, so a query costs one search, not a table open.

A table's reader, its saved index (an exact one's rows copied into memory) and
its id-to-row map stay open until the index is rewritten (an ingest extends it
under the table's writer lock, with a new ``index.json``), then they are opened
again; a query of a stored image is then its own in-memory row and one
matrix product (``Searchers(gather=True)``: queries that arrive together share
one product, :class:`Gather`; off by default, it lost on two cores). A
table without a fresh index is searched by
:func:`~pipelines.similar.search.run_search` itself.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from featurestore import FeatureStoreError, Store
from featurestore.index import SimilarityIndex
from featurestore.paths import INDEX_DIR
from featurestore.reader import TableReader
from featurestore.similarity import Neighbours, exact_search
from pipelines.similar.search import (NEIGHBOUR_COLUMNS, SearchConfig, group_codes,
                                      neighbour_frame, run_search)

METRIC = "cosine"


@dataclass
class _Open:
    stamp: tuple
    reader: TableReader
    index: SimilarityIndex
    groups: np.ndarray
    codes: dict
    meta: pd.DataFrame
    raw_rows: dict
    """``{image_id: row}`` of the raw (aug_id 0) rows, which ``query_vector`` would pick."""
    matrix: np.ndarray | None
    """An exact index's prepared rows in memory: a query is one product, no file read."""
    columns: dict = field(default_factory=dict)
    """``meta``'s columns as numpy arrays, for :meth:`Searchers.records`."""
    gather: Gather = field(default_factory=lambda: Gather())


class _Slot:
    __slots__ = ("row", "group", "k", "result", "error")

    def __init__(self, row: int, group: int, k: int):
        self.row, self.group, self.k, self.result, self.error = row, group, k, None, None


class Gather:
    """Concurrent queries of one table answered by one product: a pass over the matrix
    for all of them, not one each (the pass, memory-bound, is most of a query's cost).

    No thread of its own: the first request that finds no product running computes
    one for every query waiting, the others wait for their answer (or, arriving
    during a product, take part in the next one).
    """

    def __init__(self):
        self._ready = threading.Condition()
        self._waiting: list[_Slot] = []
        self._busy = False
        self.products = 0
        """Products computed (``queries answered / products`` is the mean batch)."""

    def search(self, opened: _Open, row: int, group: int, k: int) -> Neighbours:
        slot = _Slot(row, group, k)
        with self._ready:
            self._waiting.append(slot)
            while self._busy and slot.result is None and slot.error is None:
                self._ready.wait()
            if slot.result is None and slot.error is None:
                self._busy, batch, self._waiting = True, self._waiting, []
            else:
                batch = None
        if batch is not None:
            self._answer(opened, batch)
        if slot.error is not None:
            raise slot.error
        return slot.result

    def _answer(self, opened: _Open, batch: list[_Slot]) -> None:
        try:
            result = exact_search(opened.matrix[[s.row for s in batch]], opened.matrix,
                                  max(s.k for s in batch), metric=METRIC, base_prepared=True,
                                  query_groups=np.array([s.group for s in batch]),
                                  base_groups=opened.groups)
            answers = [Neighbours(result.distance[i: i + 1, : s.k],
                                  result.index[i: i + 1, : s.k]) for i, s in enumerate(batch)]
        except BaseException as err:  # every waiting request gets it
            answers, error = None, err
        with self._ready:
            for i, s in enumerate(batch):
                if answers is None:
                    s.error = error
                else:
                    s.result = answers[i]
            self._busy = False
            self.products += 1
            self._ready.notify_all()


class Searchers:
    """The open tables of one server process."""

    def __init__(self, store: Store, *, gather: bool = False):
        self.store = store
        self.gather = gather
        """Answer concurrent queries of a table by one product (:class:`Gather`); False
        (default): one product each. On the quiet 2-core machine gathering lost
        (bench_serve, 8 threads: 545 q/s one product each, 186 gathered): one
        product at a time leaves the second core idle, and an 8-row product costs
        more than a third of 8 single ones."""
        self._open: dict[str, _Open] = {}
        self._resolved: dict = {}
        self._lock = threading.Lock()

    def search(self, table: str, image_id: str, k: int) -> pd.DataFrame:
        """Neighbours of stored image ``image_id`` in ``table``: ``run_search``'s frame."""
        opened, result = self._query(table, image_id, k)
        return result if opened is None else neighbour_frame(opened.meta, result)

    def records(self, table: str, image_id: str, k: int) -> list[dict]:
        """:meth:`search` as JSON-ready rows (``rank``, the neighbour columns, ``distance``),
        built from numpy: formatting 10 rows through pandas cost more than the search."""
        opened, result = self._query(table, image_id, k)
        if opened is None:
            return frame_records(result)
        rows = result.index[0]
        found = rows >= 0
        columns = [(c, opened.columns[c][rows[found]]) for c in NEIGHBOUR_COLUMNS]
        return [{"rank": n + 1, **{c: _plain(values[n]) for c, values in columns},
                 "distance": float(distance)}
                for n, distance in enumerate(result.distance[0][found])]

    def _query(self, table: str, image_id: str, k: int):
        """``(opened, Neighbours)``; ``(None, run_search's frame)`` without a fresh index."""
        lineage = self._resolved.get(table)
        if lineage is None:  # resolving reads every table's lineage file: once per name
            lineage = self._resolved.setdefault(table, self.store.resolve(table))
        opened = self._get(lineage)
        if opened is None:
            return None, run_search(SearchConfig(store=self.store.root, table=lineage.key,
                                                 query=image_id, k=k))
        row = opened.raw_rows.get(image_id)
        if row is None:
            raise FeatureStoreError(f"No image {image_id!r} in table {lineage.key}.")
        group = np.array([opened.codes[image_id]])
        if opened.matrix is None:  # HNSW: the graph answers, the query read from the table
            vector = opened.reader.read_features(np.array([row]))
            return opened, opened.index.search(vector, k, query_groups=group,
                                               base_groups=opened.groups)
        # The prepared row is its own query (normalised: cosine is indifferent).
        return opened, opened.gather.search(opened, row, group[0], k) if self.gather else \
            exact_search(opened.matrix[row], opened.matrix, k, metric=METRIC,
                         base_prepared=True, query_groups=group, base_groups=opened.groups)

    def _get(self, lineage) -> _Open | None:
        meta_file = self.store.table_dir(lineage) / INDEX_DIR / METRIC / "index.json"
        try:
            info = os.stat(meta_file)
        except FileNotFoundError:
            return None
        stamp = (info.st_ino, info.st_mtime_ns)
        with self._lock:
            opened = self._open.get(lineage.key)
            if opened is not None and opened.stamp == stamp:
                return opened
            reader = TableReader(self.store.table_dir(lineage),
                                 labels=self.store.attached_labels())
            try:
                index = SimilarityIndex.load(reader, metric=METRIC)
            except FeatureStoreError:
                reader.close()
                return None  # stale: run_search searches the table exactly
            groups, codes = group_codes(reader)
            # The previous reader is left to the garbage collector: a request may still use it.
            # Plain numpy columns, only those neighbour_frame shows: taking 10 rows of the
            # full Arrow-backed metadata cost as much as the search itself.
            meta = pd.DataFrame({c: reader.column(c) if c == "aug_id" else
                                 pd.Series(reader.column(c), dtype=object)
                                 for c in NEIGHBOUR_COLUMNS})
            raw = np.flatnonzero(meta["aug_id"].to_numpy() == 0)
            raw_rows = dict(zip(meta["image_id"].to_numpy()[raw], raw.tolist()))
            matrix = None if index.vectors is None else np.array(index.vectors)
            self._open[lineage.key] = _Open(stamp, reader, index, groups, codes, meta,
                                            raw_rows, matrix,
                                            {c: meta[c].to_numpy() for c in meta.columns})
            return self._open[lineage.key]


def frame_records(frame: pd.DataFrame) -> list[dict]:
    """Rows as JSON-ready dicts (NaN as None)."""
    return frame.astype(object).where(frame.notna(), None).to_dict("records")


def _plain(value):
    """A numpy scalar as its Python value; NaN as None (JSON has no NaN)."""
    value = value.item() if isinstance(value, np.generic) else value
    return None if isinstance(value, float) and value != value else value
