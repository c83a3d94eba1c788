"""``featurestore tables STORE``: list the feature tables of a store."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click
import pandas as pd

from featurestore import FeatureStoreError, Store

#: Columns the listing prints; the table is shown by its ``Lineage.name``. The frame
#: also keeps each name's parts (backbone, pool, input, augment, precision, runtime)
#: for filtering.
LISTED = ["key", "rows", "dim", "formats", "size_mb", "name", "weights", "pending"]


@dataclass
class TablesConfig:
    store: Path
    """Store folder to list."""


def run_tables(config: TablesConfig) -> pd.DataFrame:
    """One row per table: key, rows, dimension, formats, size on disk, name and lineage fields."""
    store = Store(config.store, create=False)
    records = []
    for info in store.tables():
        lin = info.lineage
        h, w = lin.input_size
        records.append({
            "key": info.key, "rows": info.rows, "dim": info.dimension,
            "formats": ",".join(info.formats) or "-", "size_mb": info.size_bytes / 2**20,
            "name": lin.name,
            "weights": lin.weights + (f" ({lin.weights_sha256[:12]})" if lin.weights_sha256
                                      else ""),
            "pending": ",".join(info.pending_writers),
            "backbone": lin.backbone, "pool": lin.pool, "input": f"{h}x{w}",
            "augment": lin.augmentation_preset, "precision": lin.precision,
            "runtime": lin.runtime,
        })
    return pd.DataFrame.from_records(records, columns=LISTED + [
        "backbone", "pool", "input", "augment", "precision", "runtime"])


def format_tables(frame: pd.DataFrame) -> str:
    """The printed listing of :func:`run_tables`' frame."""
    return frame[LISTED].to_string(index=False, float_format=lambda v: f"{v:.1f}")


@click.command("tables")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--versions", is_flag=True, help="Also print each table's library versions.")
def command(store: Path, versions: bool):
    """List the feature tables in STORE with rows, dimension, lineage and size."""
    try:
        frame = run_tables(TablesConfig(store=store))
    except FeatureStoreError as err:
        raise click.ClickException(str(err)) from err
    if frame.empty:
        click.echo(f"No feature tables in {store} yet; `featurestore extract` writes them.")
        return
    click.echo(format_tables(frame))
    if versions:
        for lin in Store(store, create=False).lineages():
            pairs = ", ".join(f"{k} {v}" for k, v in sorted(lin.library_versions.items()))
            click.echo(f"{lin.key}: {pairs or 'no versions recorded'}")
