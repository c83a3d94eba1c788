"""The store: one folder holding a dataset manifest and any number of feature tables.

Every name inside it is owned by :mod:`featurestore.paths`: ``store.paths.leaderboard``,
``store.paths.models_of(key)``, ...
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featurestore.errors import (AmbiguousTableError, FeatureStoreError, TableNotFoundError)
from featurestore.lineage import Lineage, parse_query
from featurestore.reader import TableReader
from featurestore.commit import commit_pending
from featurestore.paths import LINEAGE_FILE, StorePaths, table_pending
from featurestore.tablefiles import read_table_lineage, table_formats
from featurestore.writer import TableWriter

TableQuery = str | Mapping[str, Any] | Lineage


@dataclass(frozen=True)
class TableInfo:
    """One line of ``featurestore tables``."""

    key: str
    lineage: Lineage
    formats: tuple[str, ...]
    rows: int
    dimension: int
    size_bytes: int
    pending_writers: tuple[str, ...]


class Store:
    """A feature store rooted at a folder (created on first use).

    Examples
    --------
    >>> store = Store(tmp_path)                                  # doctest: +SKIP
    >>> with store.writer(lineage, formats=("hdf5", "parquet")) as w:  # doctest: +SKIP
    ...     w.append(X, image_id=ids, label=labels, split=splits)
    >>> X, y, ids, groups = store.open("densenet121/max").to_numpy(split="train")  # doctest: +SKIP
    """

    def __init__(self, root: str | Path, *, create: bool = True):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise FeatureStoreError(f"Store path {self.root} exists and is not a directory.")
        if not self.root.exists():
            if not create:
                raise FeatureStoreError(f"No store at {self.root}.")
            self.root.mkdir(parents=True)
        self.paths = StorePaths(self.root)
        """Every file and folder of the store (:class:`featurestore.paths.StorePaths`)."""

    @classmethod
    def of(cls, store: str | Path | Store, *, create: bool = True) -> Store:
        """``store`` itself if it is a :class:`Store`, else the store rooted at that path.

        For public entry points that accept a path too; stages pass the ``Store``.
        """
        return store if isinstance(store, Store) else cls(store, create=create)

    @property
    def tables_dir(self) -> Path:
        return self.paths.tables

    @property
    def manifest_path(self) -> Path:
        return self.paths.manifest

    def manifest(self):
        """The dataset manifest (:class:`featurestore.manifest.Manifest`)."""
        from featurestore.manifest import Manifest

        if not self.manifest_path.exists():
            raise FeatureStoreError(
                f"Store {self.root} has no manifest yet; run `featurestore scan DATASET "
                f"--store {self.root}` first.")
        return Manifest(self.manifest_path)

    # -- tables -------------------------------------------------------------
    def table_dir(self, lineage: Lineage) -> Path:
        return self.paths.table(lineage.key)

    def lineages(self) -> list[Lineage]:
        """Lineage of every table in the store, sorted by key."""
        if not self.tables_dir.is_dir():
            return []
        found = [read_table_lineage(d) for d in sorted(self.tables_dir.iterdir())
                 if (d / LINEAGE_FILE).exists()]
        return sorted(found, key=lambda lin: lin.key)

    def resolve(self, query: TableQuery) -> Lineage:
        """The one table matching ``query`` (see :func:`~featurestore.lineage.parse_query`)."""
        if isinstance(query, Lineage):
            if not (self.table_dir(query) / LINEAGE_FILE).exists():
                raise TableNotFoundError(
                    f"No table {query.key} in store {self.root}. {self._known()}")
            return query
        wanted = parse_query(query)
        matches = [lin for lin in self.lineages() if lin.matches(wanted)]
        if not matches:
            raise TableNotFoundError(f"No table matches {_show(query)}. {self._known()}")
        if len(matches) > 1:
            listing = "\n".join(f"  {_describe(lin)}" for lin in matches)
            raise AmbiguousTableError(
                f"{len(matches)} tables match {_show(query)}; name one by key or add fields "
                f"(weights=..., input_size=..., augmentation=..., precision=...):\n{listing}")
        return matches[0]

    def _known(self) -> str:
        known = self.lineages()
        if not known:
            return "The store has no tables yet (run `featurestore extract`)."
        return "Tables in the store:\n" + "\n".join(f"  {_describe(lin)}" for lin in known)

    def open(self, query: TableQuery, *, format: str | None = None) -> TableReader:
        """A :class:`TableReader` for the table matching ``query``."""
        return TableReader(self.table_dir(self.resolve(query)), format=format,
                           labels=self.attached_labels())

    def attached_labels(self):
        """Labels given to inbox images after their rows were written (``image_id, label,
        split``; see :meth:`Manifest.attach_labels`); ``None`` when there are none."""
        from featurestore.manifest import Manifest

        if not self.paths.manifest.exists():
            return None
        with Manifest(self.paths.manifest) as manifest:
            labels = manifest.attached_labels()
        return labels if len(labels) else None

    def writer(self, lineage: Lineage, *, formats=("hdf5",), shard: str | None = None,
               writer_id: str | None = None, rows_per_part: int = 4096,
               consolidate: bool = True, commit_seconds: float | None = None) -> TableWriter:
        """A :class:`TableWriter` for ``lineage``'s table (created if new).

        ``shard="K/N"`` (or any ``writer_id``) makes a part writer whose rows
        become visible at :meth:`commit`; several may run side by side.
        """
        if shard is not None:
            k, n = parse_shard(shard)
            writer_id = writer_id or f"shard-{k}-of-{n}"
        return TableWriter(self.table_dir(lineage), lineage, formats, writer_id=writer_id,
                           rows_per_part=rows_per_part, consolidate=consolidate,
                           commit_seconds=commit_seconds)

    def commit(self, query: TableQuery) -> dict:
        """Merge finished part writers' rows into the table (see ``commit_pending``)."""
        lineage = self.resolve(query)
        return commit_pending(self.table_dir(lineage), lineage)

    def info(self, lineage: Lineage) -> TableInfo:
        table_dir = self.table_dir(lineage)
        formats = tuple(table_formats(table_dir))
        rows = dimension = 0
        if formats:
            with TableReader(table_dir, format=formats[0]) as reader:
                rows, dimension = len(reader), reader.dimension
        size = sum(p.stat().st_size for p in table_dir.rglob("*") if p.is_file())
        pending = table_pending(table_dir)
        writers = tuple(sorted(p.name for p in pending.iterdir())) if pending.is_dir() else ()
        return TableInfo(lineage.key, lineage, formats, rows, dimension, size, writers)

    def scores(self, *, model: str | None = None, image_ids=None):
        """Scores that ``ingest`` wrote, as a :class:`pandas.DataFrame`: image_id, model,
        model_version, predicted, threshold, scored_at, proba_<label>... (see
        :func:`featurestore.scores.read_scores`)."""
        from featurestore.scores import read_scores

        return read_scores(self.paths.scores, model=model, image_ids=image_ids)

    def tables(self) -> list[TableInfo]:
        """A :class:`TableInfo` for every table."""
        return [self.info(lin) for lin in self.lineages()]


def parse_shard(shard: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)`` with ``1 <= K <= N``."""
    k, sep, n = str(shard).partition("/")
    try:
        k_i, n_i = int(k), int(n)
    except ValueError:
        k_i = n_i = 0
    if not sep or not 1 <= k_i <= n_i:
        raise FeatureStoreError(f"shard must be K/N with 1 <= K <= N, e.g. 2/4; got {shard!r}.")
    return k_i, n_i


def _describe(lin: Lineage) -> str:
    return f"{lin.key}  {lin.name}  weights={lin.weights}"


def _show(query: Any) -> str:
    return repr(query) if not isinstance(query, Mapping) else repr(dict(query))
