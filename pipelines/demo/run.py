"""``featurestore demo``: the main job end to end on the bundled digits dataset.

Writes scikit-learn's real digit scans as an image folder, scans it into a
store, extracts DenseNet121 features (max and avg pooling from one pass),
compares the two tables as a similarity hash (precision@k), tunes classifier
heads on both tables and prints the leaderboard, audits the labels and retrains
on a cleaned view, scores new images with a saved head and writes the HTML
report. Nothing to configure; ImageNet weights come through Keras' own
download and cache, and where they cannot (offline, nothing cached) the demo
says so and uses seeded random weights. Rerunning it resumes from what is
already there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from featurestore import FeatureStoreError
from pipelines.backbones.registry import get_spec
from featurestore.views import ViewStore
from pipelines.audit.run import AuditLabelsConfig, run_audit_labels
from pipelines.demo.data import write_digits_dataset, write_new_scans
from pipelines.similar.evaluate import EvalSearchConfig, comparison_table, run_eval_search
from pipelines.extract.run import ExtractConfig, run_extract
from pipelines.heads.fit import FitHeadsConfig, run_fit_heads
from pipelines.heads.leaderboard import format_leaderboard
from pipelines.heads.predict import PredictConfig, run_predict
from pipelines.report.run import ReportConfig, run_report
from pipelines.scan import ScanConfig, run_scan
from pipelines.tables import TablesConfig, format_tables, run_tables
from pipelines.backbones.weights import WeightsError, resolve_weights


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
    accept_top: int = 10
    """Label-audit suspects dropped into the demo's cleaned view (digits' labels are
    clean, so this shows the loop rather than a gain)."""
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
        weights=weights, image_size=config.image_size, format="both",
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
    max_key = extract.tables["max"]
    audit, cleaned = _audit_and_refit(config, max_key, echo)
    echo("\nLeaderboard (held-out split):")
    echo(format_leaderboard(cleaned.leaderboard))

    echo(f"\nScoring {config.workdir / 'new_scans'} with {max_key}/{config.heads[0]} ...")
    predict = run_predict(PredictConfig(
        inputs=write_new_scans(config.workdir / "new_scans", size=config.image_size),
        store=config.store, model=f"{max_key}/{config.heads[0]}",
        out=config.workdir / "predictions.csv", progress=config.progress), echo=echo)
    echo(predict.summary())

    report = run_report(ReportConfig(store=config.store), echo=echo)
    tables = run_tables(TablesConfig(store=config.store))
    echo("\nFeature tables:")
    echo(format_tables(tables))
    echo(f"\nOpen the report in a browser: {report}")
    return {"scan": scan, "extract": extract, "eval_search": search, "fit_heads": heads,
            "audit": audit, "fit_heads_view": cleaned, "predict": predict, "report": report,
            "tables": tables}


def _audit_and_refit(config: DemoConfig, table_key: str, echo):
    """Audit the max table's labels, drop the top suspects into view ``demo-clean``
    (reused on a rerun) and refit the first head on it."""
    view = "demo-clean"
    exists = view in ViewStore(config.store).names()
    audit = run_audit_labels(AuditLabelsConfig(
        store=config.store, table=table_key, top=24,
        view=None if exists else view, accept_top=None if exists else config.accept_top,
        reason="demo: top suspects of the first audit"), echo=echo)
    cleaned = run_fit_heads(FitHeadsConfig(store=config.store, table=table_key,
                                           heads=config.heads[:1], n_trials=config.n_trials,
                                           view=view), echo=echo)
    return audit, cleaned


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
