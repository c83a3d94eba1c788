"""``featurestore index``: build a nearest-neighbour index beside a feature table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from featurestore import FeatureStoreError, Store
from featurestore.index import KINDS, SimilarityIndex
from featurestore.similarity import METRICS, exact_search


@dataclass
class IndexConfig:
    store: Path
    """Store folder."""
    table: str
    """Table query, e.g. ``densenet121/max`` or a key."""
    metric: str = "cosine"
    """``cosine`` or ``l2``."""
    kind: str = "auto"
    """``exact``, ``hnsw`` (approximate, needs faiss) or ``auto`` (HNSW from 1M rows)."""
    recall_queries: int = 200
    """Queries used to measure an approximate index's recall@10 against exact search."""
    seed: int = 0
    """Seed of the recall queries."""


def run_index(config: IndexConfig) -> dict:
    """Build and save the index; returns a summary (with ``recall_at_10`` for HNSW)."""
    with Store(config.store, create=False).open(config.table) as reader:
        index = SimilarityIndex.build(reader, metric=config.metric, kind=config.kind)
        summary = {"table": reader.key, "kind": index.kind, "metric": index.metric,
                   "rows": index.rows, "build_seconds": index.meta["build_seconds"],
                   "path": str(index.directory)}
        if index.kind != "exact":
            summary["recall_at_10"] = measure_recall(reader.read_features(), index,
                                                     config.recall_queries, config.seed)
    return summary


def measure_recall(X: np.ndarray, index: SimilarityIndex, n_queries: int, seed: int,
                   k: int = 10) -> float:
    """Mean overlap of the index's top-k with exact search, over sampled table rows."""
    rows = np.random.default_rng(seed).choice(len(X), size=min(n_queries, len(X)),
                                              replace=False)
    approx = index.search(X[rows], k)
    exact = exact_search(X[rows], X, k, metric=index.metric)
    hits = [len(set(a[a >= 0]) & set(b[b >= 0])) / k for a, b in zip(approx.index, exact.index)]
    return float(np.mean(hits))


@click.command("index")
@click.option("--store", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--table", required=True, help="Table query, e.g. densenet121/max, or a key.")
@click.option("--metric", type=click.Choice(METRICS), default="cosine", show_default=True)
@click.option("--kind", type=click.Choice(("auto",) + KINDS), default="auto", show_default=True,
              help="exact (BLAS, always exact), hnsw (approximate, faiss) or auto.")
def command(store: Path, table: str, metric: str, kind: str):
    """Build a nearest-neighbour index beside a feature table."""
    try:
        summary = run_index(IndexConfig(store=store, table=table, metric=metric, kind=kind))
    except FeatureStoreError as err:
        raise click.ClickException(str(err)) from err
    line = (f"Built {summary['kind']} {summary['metric']} index of {summary['table']} "
            f"({summary['rows']} rows) in {summary['build_seconds']:.1f}s at {summary['path']}")
    if "recall_at_10" in summary:
        line += f"; recall@10 against exact search: {summary['recall_at_10']:.3f}"
    click.echo(line)
