"""``featurestore verify``: the probability that two images are of one class.

From the distance of their rows in a derived (embedding) table, through the
verifier that ``fit-embedding`` calibrated on validation pairs
(``verifier.json`` beside the table). An image is an image id (or a unique
prefix of 8+ characters) or a file; a file not in the table is extracted with
the parent's recipe and projected first. ``--pairs CSV`` scores many pairs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import pandas as pd

from classifiers.errors import ClassifierError
from featurestore import FeatureStoreError, Store, TableReader
from featurestore._io import hash_file, write_csv
from featurestore.paths import table_verifier
from pipelines.embedding.derived import UsageFailed, featurize_for, parent_of
from pipelines.similar.search import group_codes, query_vector


@dataclass
class VerifyConfig:
    store: Path
    """Store folder."""
    embedding: str
    """The derived table: its name (``densenet121/avg/224+emb128``), a query or its key."""
    pairs: list[tuple[str, str]] = field(default_factory=list)
    """``(a, b)`` pairs of image ids or image files."""
    weights: str | None = None
    """The parent's weights file, to extract new images of a file recipe."""


def run_verify(config: VerifyConfig) -> pd.DataFrame:
    """One row per pair: a, b, distance, probability (same class), same (probability >= 0.5)."""
    from classifiers.embedding.verifier import PairVerifier, pair_distances

    if not config.pairs:
        raise FeatureStoreError("No pairs to verify; give A B or --pairs CSV.")
    store = Store(config.store, create=False)
    lineage = store.resolve(config.embedding)
    parent_of(lineage)
    path = table_verifier(store.table_dir(lineage))
    if not path.is_file():
        raise FeatureStoreError(f"Derived table {lineage.key} has no calibrated verifier "
                                f"({path}); rerun `featurestore fit-embedding`.")
    verifier = PairVerifier.from_dict(json.loads(path.read_text(encoding="utf-8")))
    with store.open(lineage) as reader:
        vectors = _vectors(reader, {item for pair in config.pairs for item in pair},
                           config.weights)
    a, b = zip(*config.pairs)
    distance = pair_distances(np.stack([vectors[x] for x in a]), np.stack([vectors[x] for x in b]))
    probability = verifier.predict_proba(distance)
    return pd.DataFrame({"a": a, "b": b, "distance": distance, "probability": probability,
                         "same": probability >= 0.5})


def _vectors(reader: TableReader, items: set[str], weights: str | None) -> dict[str, np.ndarray]:
    """Embedding of every image named in ``items``: the table's raw row, or extracted."""
    _, codes = group_codes(reader)
    new = sorted(i for i in items if Path(i).is_file() and hash_file(i) not in codes)
    vectors = {}
    if new:
        X, _, errors = featurize_for(reader.table_dir, reader.lineage, new, weights_path=weights)
        if errors:
            raise FeatureStoreError(f"Cannot read image {errors[0][0]}: {errors[0][1]}")
        vectors.update(zip(new, X))
    for item in items - set(new):
        vectors[item] = query_vector(reader, item, codes)[0]
    return vectors


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """Pairs from a CSV with columns ``a`` and ``b`` (image ids or files)."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    if not {"a", "b"} <= set(frame.columns):
        raise FeatureStoreError(f"Pairs file {path} needs columns a and b; it has "
                                f"{', '.join(frame.columns)}.")
    return list(zip(frame["a"], frame["b"]))


@click.command("verify")
@click.argument("a", required=False)
@click.argument("b", required=False)
@click.option("--store", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--embedding", required=True, help="Derived table, e.g. densenet121/avg+emb128.")
@click.option("--pairs", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=None, help="CSV with columns a, b: one pair per row.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the scored pairs to this CSV instead of printing them.")
@click.option("--weights", default=None, help="The parent's weights file (file recipes).")
def command(a, b, store, embedding, pairs, out, weights):
    """Probability that images A and B (image ids or files) are of the same class."""
    try:
        if (a is None) != (b is None) or (a is None) == (pairs is None):
            raise FeatureStoreError("Give two images A B, or --pairs CSV (not both).")
        chosen = read_pairs(pairs) if pairs else [(a, b)]
        frame = run_verify(VerifyConfig(store=store, embedding=embedding, pairs=chosen,
                                        weights=weights))
    except (FeatureStoreError, ClassifierError, ValueError) as err:
        raise UsageFailed(str(err)) from err
    if out is not None:
        write_csv(frame, out)
        click.echo(f"{len(frame)} pair(s) scored, {int(frame['same'].sum())} same class: {out}")
    else:
        click.echo(frame.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
