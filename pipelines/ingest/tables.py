"""A new image's raw row in a feature table, computed with exactly that table's recipe.

:func:`append_to_table` is the one place that grows a table by new images: it
is what ``ingest`` (CLI and HTTP) calls for every table of the store, and what
a derived table kept up to date later would call with its own lineage.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featurestore import Lineage, Store
from featurestore.errors import WriterLockedError
from featurestore.index import SimilarityIndex
from featurestore.paths import INDEX_DIR
from featurestore.reader import TableReader
from featurestore.writer import TableWriter

#: Seconds between two tries to take a table's writer lock.
_LOCK_POLL_S = 0.2
#: Parts an ingest lets pile up before folding them into the table's single HDF5 file:
#: a fold copies the whole file, so one per batch made a batch cost the table's size.
CONSOLIDATE_AFTER_PARTS = 32


@dataclass(frozen=True)
class NewImage:
    """One image to add: its bytes at ``file`` hash to ``image_id``."""

    image_id: str
    file: Path
    label: str
    split: str
    path: str
    """What the table's ``path`` column shows (the copy's path inside the store)."""


#: Backbones built in this process, by engine settings: building one costs seconds, so
#: every ingest session of a process (a server's, a notebook's runs) shares them.
_BUILT: dict = {}
_BUILDING = threading.Lock()


@dataclass
class Engines:
    """Backbones built once per recipe and process, reused by every later batch."""

    batch_size: int = 32
    """Images per backbone call and per committed part (the server's batches are <= 32)."""
    cache_dir: Path | None = None
    """Where the runtime keeps converted models (``store.paths.openvino_cache``)."""

    def get(self, lineage: Lineage):
        from pipelines.extract.engine import FeatureEngine
        from pipelines.extract.featurize import engine_settings_for

        settings = engine_settings_for(lineage, batch_size=self.batch_size,
                                       cache_dir=self.cache_dir)
        key = repr(settings)
        with _BUILDING:
            if key not in _BUILT:
                _BUILT[key] = FeatureEngine(settings)
        return settings, _BUILT[key]


@contextmanager
def open_writer(store: Store, lineage: Lineage, *, timeout: float) -> Iterator[TableWriter]:
    """The table's writer, waiting up to ``timeout`` seconds while another process holds it.

    Opened once: ``with`` on an opened writer opens it again, which reads every
    committed part's keys a second time (a fifth of a small batch's ingest)."""
    deadline = time.monotonic() + timeout
    while True:
        writer = store.writer(lineage, formats=_formats(store, lineage), consolidate=False)
        try:
            writer.open()
            break
        except WriterLockedError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(_LOCK_POLL_S)
    try:
        yield writer
    except BaseException:
        writer.__exit__(*sys.exc_info())
        raise
    writer.close()


def _formats(store: Store, lineage: Lineage) -> tuple[str, ...]:
    from featurestore.tablefiles import table_formats

    return tuple(table_formats(store.table_dir(lineage))) or ("hdf5",)


def append_to_table(store: Store, lineage: Lineage, images: Mapping[str, NewImage],
                    engines: Engines, *, timeout: float = 60.0,
                    features: dict[str, np.ndarray] | None = None) -> tuple[int, dict[str, str]]:
    """Extract and append the raw row of every image the table lacks; then extend its indexes.

    Each engine batch is committed as one part, so a kill loses at most the batch
    in flight and a rerun appends only what is still missing. Returns
    ``(rows added, {image_id: reason})`` for images that could not be extracted;
    ``features``, when given, receives each appended image's row ``(n_features,)``
    (what the table now holds: heads score from it without reading the table).
    """
    from pipelines.extract.featurize import iter_feature_batches

    added, failed = 0, {}
    with open_writer(store, lineage, timeout=timeout) as writer:
        todo = [img for img in images.values() if not writer.known([(img.image_id, 0)])[0]]
        if todo:
            settings, engine = engines.get(lineage)
            by_id = {img.image_id: img for img in todo}
            files = ((img.file, img.image_id) for img in todo)
            for batch in iter_feature_batches(files, lineage, settings, engine=engine):
                if batch.image_ids:
                    rows = [by_id[i] for i in batch.image_ids]
                    writer.append(batch.X, image_id=batch.image_ids,
                                  label=[r.label for r in rows], split=[r.split for r in rows],
                                  path=[r.path for r in rows])
                    writer.flush()
                    added += len(rows)
                    if features is not None:
                        features.update(zip(batch.image_ids, batch.X))
                failed.update((image_id, reason) for _, image_id, reason in batch.errors)
        # Still under the writer lock: no other ingest can grow the table meanwhile.
        consolidate_if_many(writer)
        refresh_indexes(store, lineage)
    return added, failed


def consolidate_if_many(writer: TableWriter) -> None:
    """Fold the table's parts into its single file once :data:`CONSOLIDATE_AFTER_PARTS`
    have piled up (call under the writer's lock)."""
    from featurestore.formats import get_format

    for name in writer.formats:
        fmt = get_format(name)
        if len(fmt.part_paths(writer.data_dir / name)) >= CONSOLIDATE_AFTER_PARTS:
            fmt.consolidate(writer.data_dir / name, writer.lineage)


def refresh_indexes(store: Store, lineage: Lineage) -> list[str]:
    """Extend every saved index of the table that no longer covers all its rows with
    the rows it lacks (same metric and kind). Returns the metrics extended."""
    index_root = store.table_dir(lineage) / INDEX_DIR
    if not index_root.is_dir():
        return []
    rebuilt = []
    with TableReader(store.table_dir(lineage)) as reader:
        for folder in sorted(p for p in index_root.iterdir() if (p / "index.json").exists()):
            meta = json.loads((folder / "index.json").read_text())
            if meta["rows"] != len(reader):
                SimilarityIndex.extend(reader, metric=meta["metric"])
                rebuilt.append(meta["metric"])
    return rebuilt
