"""``featurestore demo``: the main job end to end on the bundled digits dataset.

Writes scikit-learn's real digit scans as an image folder, scans it into a
store, extracts DenseNet121 features (max and avg pooling from one pass),
compares the two tables as a similarity hash (precision@k), tunes classifier
heads on both tables and prints the leaderboard. Nothing to configure; ImageNet weights come through Keras' own
download and cache, and where they cannot (offline, nothing cached) the demo
says so and uses seeded random weights. Rerunning it resumes from what is
already there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from featurestore import FeatureStoreError
from pipelines.backbones import get_spec
from pipelines.demo_data import write_digits_dataset
from pipelines.eval_search import EvalSearchConfig, comparison_table, run_eval_search
from pipelines.extract import ExtractConfig, run_extract
from pipelines.fit_heads import FitHeadsConfig, run_fit_heads
from pipelines.leaderboard import format_leaderboard
from pipelines.scan import ScanConfig, run_scan
from pipelines.tables import TablesConfig, run_tables
from pipelines.weights import WeightsError, resolve_weights


@dataclass
class DemoConfig:
    """Where the demo writes its dataset and store, and how big it runs."""

    workdir: Path = Path("featurestore-demo")
    """Folder for ``digits/`` (the image folder) and ``store/`` (the feature store)."""
    image_size: int = 64
    """Side of the written digit images and of the backbone input, in pixels (at 64,
    DenseNet121's final feature map is 2x2, so max and avg pooling differ)."""
    backbone: str = "densenet121"
    """Registered backbone for the extract stage."""
    weights: str = "auto"
    """``imagenet``, ``none``, a weights file, or ``auto``: ImageNet when Keras can
    provide it, else seeded random weights."""
    heads: tuple[str, ...] = ("logreg", "knn")
    """Classifier heads tuned on each table."""
    n_trials: int = 5
    """Optuna trials per head and table."""
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

    weights = _demo_weights(config, echo)
    extract = run_extract(ExtractConfig(
        dataset=config.dataset, store=config.store, backbone=config.backbone, pool="both",
        weights=weights, image_size=config.image_size, formats="both",
        progress=config.progress))
    echo("\n" + extract.summary())

    search = run_eval_search(EvalSearchConfig(store=config.store, tables=list(extract.tables.values()),
                                              ks=(10,), queries=(256,)))
    echo("\nNearest neighbours sharing the query's class (precision@10, 256 queries):")
    echo(comparison_table(search).to_string(float_format=lambda v: f"{v:.3f}"))

    heads = None
    for key in extract.tables.values():
        heads = run_fit_heads(FitHeadsConfig(store=config.store, table=key,
                                             heads=config.heads, n_trials=config.n_trials),
                              echo=echo)
    echo("\nLeaderboard (held-out split):")
    echo(format_leaderboard(heads.leaderboard))

    tables = run_tables(TablesConfig(store=config.store))
    echo("\nFeature tables:")
    echo(tables.to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    return {"scan": scan, "extract": extract, "eval_search": search, "fit_heads": heads,
            "tables": tables}


def _demo_weights(config: DemoConfig, echo) -> str:
    if config.weights != "auto":
        return config.weights
    try:
        resolve_weights(get_spec(config.backbone), "imagenet")
    except WeightsError as err:
        echo(f"\nNote: ImageNet weights are not available here ({err}).\n"
             f"The demo goes on with seeded random weights; the numbers below then show "
             f"the pipeline, not ImageNet features.")
        return "none"
    return "imagenet"


@click.command("demo")
@click.option("--workdir", default=Path("featurestore-demo"), show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the demo dataset and store.")
@click.option("--weights", default="auto", show_default=True,
              help="imagenet, none, a weights file, or auto (ImageNet if Keras can get it).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def command(workdir: Path, weights: str, quiet: bool):
    """Run the pipeline end to end on the bundled digits dataset (nothing to configure)."""
    try:
        run_demo(DemoConfig(workdir=workdir, weights=weights, progress=not quiet),
                 echo=click.echo)
    except FeatureStoreError as err:
        raise click.ClickException(str(err)) from err
