"""``featurestore eval-search``: precision@k of stored features used as a similarity hash.

For sampled query images, the fraction of their k nearest stored rows that
share their class, per table and per class. A query's own augmented views are
never counted as neighbours. This is the users' study of max vs avg pooling:
the printed table puts the tables side by side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import pandas as pd

from featurestore import FeatureStoreError, Store
from featurestore.similarity import METRICS, Neighbours, exact_search, precision_at_k
from featurestore.splits import INBOX
from pipelines.similar.search import group_codes, search_table


@dataclass
class EvalSearchConfig:
    store: Path
    """Store folder."""
    tables: list[str] = field(default_factory=list)
    """Table queries to compare; empty means every table in the store."""
    ks: tuple[int, ...] = (10, 20)
    """Neighbourhood sizes."""
    queries: tuple[int, ...] = (256,)
    """Query sample sizes (nested samples of raw images; capped at the table's size)."""
    metric: str = "cosine"
    """``cosine`` or ``l2``."""
    split: str | None = None
    """Draw queries from this split only (neighbours come from every row)."""
    seed: int = 0
    """Seed of the query sample."""


def run_eval_search(config: EvalSearchConfig) -> pd.DataFrame:
    """Long table: table, name, queries, k, label (or ``all``), n_queries, precision.

    Also written to ``STORE/search_eval.parquet`` (rows of earlier runs for the
    same tables and settings are replaced).
    """
    if not config.ks or min(config.ks) < 1 or not config.queries or min(config.queries) < 1:
        raise FeatureStoreError(f"ks and queries must be positive; got ks={config.ks}, "
                                f"queries={config.queries}.")
    store = Store(config.store, create=False)
    lineages = [store.resolve(q) for q in config.tables] or store.lineages()
    if not lineages:
        raise FeatureStoreError(f"Store {store.root} has no tables to evaluate.")
    frames = [_evaluate_table(store, lin, config) for lin in lineages]
    result = pd.concat(frames, ignore_index=True)
    result["metric"] = config.metric
    _save(store.paths.search_eval, result)
    return result


def _evaluate_table(store: Store, lineage, config: EvalSearchConfig) -> pd.DataFrame:
    with store.open(lineage) as reader:
        groups, _ = group_codes(reader)
        labels = reader.column("label")
        # Ingested images without a label (the inbox) are neither queries nor neighbours.
        labelled = reader.column("split") != INBOX
        candidates = np.flatnonzero((reader.column("aug_id") == 0) & labelled)
        if config.split is not None:
            candidates = candidates[reader.column("split")[candidates] == config.split]
        if candidates.size == 0:
            raise FeatureStoreError(f"Table {reader.key} has no raw rows to query"
                                    f"{f' in split {config.split!r}' if config.split else ''}.")
        order = np.random.default_rng(config.seed).permutation(candidates)
        n_max = min(max(config.queries), order.size)
        rows = np.sort(order[:n_max])
        X = reader.read_features()
        if labelled.all():
            found = search_table(reader, X[rows], max(config.ks), config.metric,
                                 query_groups=groups[rows], base_groups=groups)
        else:
            found = _search_labelled(X, labelled, rows, groups, max(config.ks), config.metric)
    rank_of = {row: i for i, row in enumerate(rows)}
    neighbour_labels = np.where(found.index >= 0, labels[np.maximum(found.index, 0)], None)
    name = lineage.name
    records = []
    for n_queries in sorted(set(min(q, order.size) for q in config.queries)):
        picked = np.array([rank_of[r] for r in order[:n_queries]])
        for k in config.ks:
            precision = precision_at_k(neighbour_labels[picked, :k], labels[rows[picked]])
            per_class = pd.Series(precision).groupby(labels[rows[picked]])
            for label, values in per_class:
                records.append((lineage.key, name, n_queries, k, label, len(values),
                                float(values.mean())))
            records.append((lineage.key, name, n_queries, k, "all", len(precision),
                            float(precision.mean())))
    return pd.DataFrame.from_records(records, columns=[
        "table", "name", "queries", "k", "label", "n_queries", "precision"])


def _search_labelled(X, labelled, rows, groups, k, metric) -> Neighbours:
    """Exact search among the labelled rows only; indexes are rows of the whole table."""
    base = np.flatnonzero(labelled)
    found = exact_search(X[rows], X[base], k, metric=metric, query_groups=groups[rows],
                         base_groups=groups[base])
    index = np.where(found.index >= 0, base[np.maximum(found.index, 0)], -1)
    return Neighbours(found.distance, index)


def _save(path: Path, result: pd.DataFrame) -> None:
    if path.exists():
        old = pd.read_parquet(path)
        # Rows of files written before Lineage.name spelled tables without their size.
        names = result.drop_duplicates("table").set_index("table")["name"]
        old["name"] = old["table"].map(names).fillna(old["name"])
        same = old.set_index(["table", "metric", "queries", "k"]).index.isin(
            result.set_index(["table", "metric", "queries", "k"]).index)
        result = pd.concat([old[~same], result], ignore_index=True)
    result.to_parquet(path, index=False)


def comparison_table(result: pd.DataFrame) -> pd.DataFrame:
    """Classes as rows, (table, k) as columns: the side-by-side view that is printed."""
    largest = result[result["queries"] == result["queries"].max()]
    # Tables differing only in weights or views share a name; pivoting would average them.
    shared = largest.groupby("name")["table"].transform("nunique") > 1
    largest = largest.assign(name=largest["name"].where(
        ~shared, largest["name"] + " " + largest["table"].str[-12:]))
    table = largest.pivot_table(index="label", columns=["name", "k"], values="precision")
    ordered = [label for label in table.index if label != "all"] + ["all"]
    return table.reindex(ordered)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers; got {text!r}") from None


@click.command("eval-search")
@click.option("--store", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--tables", default="", help="Comma-separated table queries (default: all).")
@click.option("--k", "ks", default="10,20", show_default=True, help="Comma-separated k values.")
@click.option("--queries", default="256", show_default=True,
              help="Comma-separated query sample sizes.")
@click.option("--metric", type=click.Choice(METRICS), default="cosine", show_default=True)
@click.option("--split", default=None, help="Draw queries from this split only.")
@click.option("--seed", default=0, show_default=True)
def command(store, tables, ks, queries, metric, split, seed):
    """Precision@k of each table's nearest neighbours, per class, side by side."""
    config = EvalSearchConfig(store=store, tables=[t for t in tables.split(",") if t],
                              ks=_ints(ks), queries=_ints(queries), metric=metric,
                              split=split, seed=seed)
    try:
        result = run_eval_search(config)
    except FeatureStoreError as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"precision@k ({metric}, {result['queries'].max()} queries; "
               f"own augmented views excluded)")
    click.echo(comparison_table(result).to_string(float_format=lambda v: f"{v:.3f}"))
    click.echo(f"\nAll figures: {Store(store, create=False).paths.search_eval}")
