"""``featurestore search`` kept open per table, so a query costs one search, not a table open.

A table's reader, its saved index and its id-to-row map stay open until the
index is rewritten (an ingest rebuilds it under the table's writer lock, with
a new ``index.json``), then they are opened again. A table without a fresh
index is searched by :func:`~pipelines.similar.search.run_search` itself.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np
import pandas as pd

from featurestore import FeatureStoreError, Store
from featurestore.index import SimilarityIndex
from featurestore.paths import INDEX_DIR
from featurestore.reader import TableReader
from pipelines.similar.search import SearchConfig, group_codes, neighbour_frame, run_search

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


class Searchers:
    """The open tables of one server process."""

    def __init__(self, store: Store):
        self.store = store
        self._open: dict[str, _Open] = {}
        self._lock = threading.Lock()

    def search(self, table: str, image_id: str, k: int) -> pd.DataFrame:
        """Neighbours of stored image ``image_id`` in ``table``: ``run_search``'s frame."""
        lineage = self.store.resolve(table)
        opened = self._get(lineage)
        if opened is None:
            return run_search(SearchConfig(store=self.store.root, table=lineage.key,
                                           query=image_id, k=k))
        row = opened.raw_rows.get(image_id)
        if row is None:
            raise FeatureStoreError(f"No image {image_id!r} in table {lineage.key}.")
        vector, group = opened.reader.read_features(np.array([row]))[0], opened.codes[image_id]
        result = opened.index.search(vector[None, :], k, query_groups=np.array([group]),
                                     base_groups=opened.groups)
        return neighbour_frame(opened.meta, result)

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
            reader = TableReader(self.store.table_dir(lineage))
            try:
                index = SimilarityIndex.load(reader, metric=METRIC)
            except FeatureStoreError:
                reader.close()
                return None  # stale: run_search searches the table exactly
            groups, codes = group_codes(reader)
            # The previous reader is left to the garbage collector: a request may still use it.
            meta = reader.metadata()
            raw = np.flatnonzero(meta["aug_id"].to_numpy() == 0)
            raw_rows = dict(zip(meta["image_id"].to_numpy()[raw], raw.tolist()))
            self._open[lineage.key] = _Open(stamp, reader, index, groups, codes, meta,
                                            raw_rows)
            return self._open[lineage.key]
