"""``featurestore demo``: the main job end to end on the bundled digits dataset.

Writes scikit-learn's real digit scans as an image folder, scans it into a
store and lists the store's tables. Nothing to configure and nothing to
download; rerunning it resumes from what is already there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from featurestore import FeatureStoreError
from pipelines.demo_data import write_digits_dataset
from pipelines.scan import ScanConfig, run_scan
from pipelines.tables import TablesConfig, run_tables


@dataclass
class DemoConfig:
    """Where the demo writes its dataset and store."""

    workdir: Path = Path("featurestore-demo")
    """Folder for ``digits/`` (the image folder) and ``store/`` (the feature store)."""
    image_size: int = 32
    """Side of the written digit images, in pixels."""
    progress: bool = True
    """Show progress bars."""

    @property
    def dataset(self) -> Path:
        return self.workdir / "digits"

    @property
    def store(self) -> Path:
        return self.workdir / "store"


def run_demo(config: DemoConfig, echo=print) -> dict:
    """Run every stage on the digits and return each stage's result by name."""
    echo(f"Writing scikit-learn's digits to {config.dataset} ...")
    write_digits_dataset(config.dataset, size=config.image_size)
    scan = run_scan(ScanConfig(dataset=config.dataset, store=config.store,
                               progress=config.progress))
    echo(scan.summary())
    tables = run_tables(TablesConfig(store=config.store))
    echo("\nFeature tables:")
    echo(tables.to_string(index=False) if len(tables) else "  none yet")
    return {"scan": scan, "tables": tables}


@click.command("demo")
@click.option("--workdir", default=Path("featurestore-demo"), show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the demo dataset and store.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def command(workdir: Path, quiet: bool):
    """Run the pipeline end to end on the bundled digits dataset (no setup, no download)."""
    try:
        run_demo(DemoConfig(workdir=workdir, progress=not quiet), echo=click.echo)
    except FeatureStoreError as err:
        raise click.ClickException(str(err)) from err
