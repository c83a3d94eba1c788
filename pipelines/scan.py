"""``featurestore scan DATASET --store STORE``: record a dataset folder in the store's manifest.

:func:`run_scan` is the Python entry point; :data:`command` is the thin Click
layer over it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from featurestore.errors import FeatureStoreError
from featurestore.scan import ScanResult, scan_dataset
from featurestore.splits import split_targets
from featurestore.store import Store


@dataclass
class ScanConfig:
    """Settings of one scan."""

    dataset: Path
    """Image folder: ``DATASET/<split>/<class>/<image>`` or ``DATASET/<class>/<image>``."""
    store: Path
    """Feature store folder; the manifest is ``STORE/manifest.sqlite``. Created if needed."""
    seed: int = 0
    """Seed of the placement of new images in train/val/test (class-folders layout only)."""
    val_fraction: float = 0.15
    """Target fraction of each class placed in ``val`` (class-folders layout only)."""
    test_fraction: float = 0.15
    """Target fraction of each class placed in ``test`` (class-folders layout only)."""
    progress: bool = True
    """Show a progress bar over the files."""


def run_scan(config: ScanConfig) -> ScanResult:
    """Scan ``config.dataset`` into ``config.store/manifest.sqlite`` and return what changed."""
    try:
        store = Store(config.store)
    except OSError as err:
        raise FeatureStoreError(f"Cannot create store folder {config.store}: {err.strerror}") from err
    return scan_dataset(
        config.dataset,
        store.manifest_path,
        seed=config.seed,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        progress=config.progress,
    )


class _CommandFailed(click.ClickException):
    """A feature-store error shown as ``Error: <message>``, exit status 2 like other bad input."""

    exit_code = 2


_FRACTION = click.FloatRange(0.0, 1.0, max_open=True)


@click.command("scan")
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("--store", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Feature store folder; the manifest goes to STORE/manifest.sqlite.")
@click.option("--seed", default=0, show_default=True, help="Seed of the train/val/test placement.")
@click.option("--val-fraction", default=0.15, show_default=True, type=_FRACTION,
              help="Fraction of each class placed in val (DATASET/<class>/ layout only).")
@click.option("--test-fraction", default=0.15, show_default=True, type=_FRACTION,
              help="Fraction of each class placed in test (DATASET/<class>/ layout only).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def command(dataset: Path, store: Path, seed: int, val_fraction: float, test_fraction: float, quiet: bool):
    """Scan the image folder DATASET into the store's manifest.

    DATASET is DATASET/<split>/<class>/<image> (split: train, val, test) or
    DATASET/<class>/<image>, in which case each class is split into
    train/val/test with the given fractions. Rescans add new files only and
    never move an image to another split.
    """
    try:
        split_targets(val_fraction, test_fraction)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="'--val-fraction' / '--test-fraction'") from err
    config = ScanConfig(dataset, store, seed, val_fraction, test_fraction, progress=not quiet)
    try:
        result = run_scan(config)
    except FeatureStoreError as err:
        raise _CommandFailed(str(err)) from err
    click.echo(result.summary())
