"""``featurestore near-duplicates``: pairs of images whose features almost coincide.

Pairs that straddle splits are flagged as leakage: the same scan, re-saved or
slightly cropped, in train and test inflates every held-out metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import pandas as pd

from featurestore import FeatureStoreError, Store
from featurestore.paths import table_near_duplicates
from featurestore.similarity import METRICS, pairs_within


@dataclass
class NearDuplicatesConfig:
    store: Path
    """Store folder."""
    table: str
    """Table query, e.g. ``densenet121/max``, or a key."""
    threshold: float = 0.02
    """Distance below which two images count as near-duplicates."""
    metric: str = "cosine"
    """``cosine`` (1 - cos) or ``l2``."""


def run_near_duplicates(config: NearDuplicatesConfig) -> pd.DataFrame:
    """Pairs of raw images closer than the threshold, closest first.

    Columns: distance, leakage (splits differ), label_conflict (labels differ),
    then image_id, path, label and split of each side (``_a``, ``_b``). Also
    written to ``STORE/tables/<key>/near_duplicates.parquet``.
    """
    _check_threshold(config.threshold, config.metric)
    with Store(config.store, create=False).open(config.table) as reader:
        raw = np.flatnonzero(reader.column("aug_id") == 0)
        pairs = pairs_within(reader.read_features(raw), config.threshold, metric=config.metric)
        meta = reader.metadata().iloc[raw].reset_index(drop=True)
        out_path = table_near_duplicates(reader.table_dir)
    cols = ["image_id", "path", "label", "split"]
    a = meta.iloc[pairs["i"]][cols].add_suffix("_a").reset_index(drop=True)
    b = meta.iloc[pairs["j"]][cols].add_suffix("_b").reset_index(drop=True)
    result = pd.concat([pairs[["distance"]].reset_index(drop=True), a, b], axis=1)
    result.insert(1, "leakage", result["split_a"] != result["split_b"])
    result.insert(2, "label_conflict", result["label_a"] != result["label_b"])
    result.to_parquet(out_path, index=False)
    return result


def _check_threshold(threshold: float, metric: str) -> None:
    # NaN passes every comparison unnoticed (it silently matched nothing), and a
    # cosine threshold above 2 matches every pair: n^2 rows for a large table.
    if not (math.isfinite(threshold) and threshold > 0):
        raise FeatureStoreError(f"threshold must be a finite number > 0; got {threshold}.")
    if metric == "cosine" and threshold > 2:
        raise FeatureStoreError(f"threshold must be at most 2 for cosine distances (1 - cos "
                                f"lies in [0, 2]); got {threshold}.")


class _CommandFailed(click.ClickException):
    """Bad input: ``Error: <message>``, exit status 2 (as every command)."""

    exit_code = 2


@click.command("near-duplicates")
@click.option("--store", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--table", required=True, help="Table query, e.g. densenet121/max, or a key.")
@click.option("--threshold", default=0.02, show_default=True, type=float,
              help="Distance below which two images are near-duplicates.")
@click.option("--metric", type=click.Choice(METRICS), default="cosine", show_default=True)
def command(store: Path, table: str, threshold: float, metric: str):
    """List pairs of images closer than a threshold; flag pairs across splits as leakage."""
    try:
        pairs = run_near_duplicates(NearDuplicatesConfig(store=store, table=table,
                                                         threshold=threshold, metric=metric))
    except FeatureStoreError as err:
        raise _CommandFailed(str(err)) from err
    click.echo(f"{len(pairs)} near-duplicate pairs below {threshold} ({metric}); "
               f"{int(pairs['leakage'].sum())} cross splits (leakage), "
               f"{int(pairs['label_conflict'].sum())} with different labels.")
    if len(pairs):
        shown = pairs[["distance", "leakage", "label_conflict", "path_a", "split_a", "path_b",
                       "split_b"]].head(50)
        click.echo(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
