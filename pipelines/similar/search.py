"""``featurestore search``: the stored images most similar to an image or an image id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import pandas as pd

from featurestore import FeatureStoreError, Store, TableReader
from featurestore._io import hash_file
from featurestore.index import SimilarityIndex
from featurestore.similarity import METRICS, Neighbours, exact_search


@dataclass
class SearchConfig:
    store: Path
    """Store folder."""
    table: str
    """Table query, e.g. ``densenet121/max``, or a key."""
    query: str
    """An image file, or an image id (or a unique prefix of at least 8 characters).
    An image not in the table is extracted with the table's own recipe first."""
    k: int = 10
    """Number of neighbours."""
    metric: str = "cosine"
    """``cosine`` or ``l2``; uses the saved index of that metric when there is one."""
    weights: str | None = None
    """Weights file of the table's recipe, needed only to extract a new query image
    of a table computed from a file (``imagenet`` comes from Keras' cache)."""


def run_search(config: SearchConfig) -> pd.DataFrame:
    """Neighbours nearest first: rank, image_id, aug_id, label, split, path, distance.

    The query image and its own augmented views are never returned.
    """
    with Store(config.store, create=False).open(config.table) as reader:
        groups, codes = group_codes(reader)
        vector, group = query_vector(reader, config.query, codes, weights=config.weights,
                                     cache_dir=Store(config.store).paths.openvino_cache)
        result = search_table(reader, vector[None, :], config.k, config.metric,
                              query_groups=np.array([group]), base_groups=groups)
        meta = reader.metadata()
    return neighbour_frame(meta, result)


#: The table columns a neighbour is shown with.
NEIGHBOUR_COLUMNS = ("image_id", "aug_id", "label", "split", "path")


def neighbour_frame(meta: pd.DataFrame, result: Neighbours) -> pd.DataFrame:
    """The first query's neighbours as rows of the table's ``meta``, nearest first."""
    rows = result.index[0]
    found = rows >= 0
    out = meta.iloc[rows[found]][list(NEIGHBOUR_COLUMNS)]
    out = out.reset_index(drop=True)
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    out["distance"] = result.distance[0][found]
    return out


def group_codes(reader: TableReader) -> tuple[np.ndarray, dict[str, int]]:
    """Integer group per row (its image id) and the image-id-to-code map."""
    codes, uniques = pd.factorize(reader.column("image_id"))
    return codes.astype(np.int64), {image_id: i for i, image_id in enumerate(uniques)}


def query_vector(reader: TableReader, query: str, codes: dict[str, int], *,
                 weights: str | None = None, cache_dir=None) -> tuple[np.ndarray, int]:
    """Features of the query's raw row and its group code (-1 when not in the table)."""
    path = Path(query)
    if path.is_file():
        image_id = hash_file(path)
        if image_id not in codes:
            from pipelines.embedding.derived import featurize_for  # imports the backbone code

            X, _, errors = featurize_for(reader.table_dir, reader.lineage, [path],
                                         weights_path=weights, cache_dir=cache_dir)
            if errors:
                raise FeatureStoreError(f"Cannot read query image {errors[0][0]}: {errors[0][1]}")
            return X[0], -1
    else:
        matches = [i for i in codes if i.startswith(query)] if len(query) >= 8 else []
        if len(matches) != 1:
            problem = "matches no image" if not matches else f"matches {len(matches)} images"
            raise FeatureStoreError(
                f"Query {query!r} is not an image file and {problem} of table {reader.key}; "
                f"give an image path or an image id (at least 8 leading characters).")
        image_id = matches[0]
    raw = np.flatnonzero((reader.column("image_id") == image_id) & (reader.column("aug_id") == 0))
    rows = raw if raw.size else np.flatnonzero(reader.column("image_id") == image_id)[:1]
    return reader.read_features(rows)[0], codes[image_id]


def search_table(reader: TableReader, queries: np.ndarray, k: int, metric: str, *,
                 query_groups=None, base_groups=None) -> Neighbours:
    """Search the saved index of ``metric`` when it is fresh, else the table exactly."""
    try:
        index = SimilarityIndex.load(reader, metric=metric)
    except FeatureStoreError:
        return exact_search(queries, reader.read_features(), k, metric=metric,
                            query_groups=query_groups, base_groups=base_groups)
    return index.search(queries, k, query_groups=query_groups, base_groups=base_groups)


@click.command("search")
@click.argument("query")
@click.option("--store", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--table", required=True, help="Table query, e.g. densenet121/max, or a key.")
@click.option("--k", default=10, show_default=True, type=click.IntRange(1))
@click.option("--metric", type=click.Choice(METRICS), default="cosine", show_default=True)
@click.option("--weights", default=None,
              help="The table's weights file, to extract a new query image (file recipes only).")
def command(query: str, store: Path, table: str, k: int, metric: str, weights: str | None):
    """The k stored images most similar to QUERY (an image file or an image id).

    A query image that is not in the table is extracted with the table's own
    recipe (backbone, weights, input size, preprocessing, pooling) first.
    """
    try:
        frame = run_search(SearchConfig(store=store, table=table, query=query, k=k,
                                        metric=metric, weights=weights))
    except FeatureStoreError as err:
        raise click.ClickException(str(err)) from err
    frame["image_id"] = frame["image_id"].str[:12]
    click.echo(frame.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
