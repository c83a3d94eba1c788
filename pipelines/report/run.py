"""``featurestore report``: a static HTML report of a store, to decide by looking.

Sections: the dataset (counts, rejected files, duplicates and leakage,
extraction failures), the leaderboard with the comparisons users ask for
(max vs avg pooling, raw vs augmented training, head vs head, before vs after
label cleaning; each metric's spread across CV folds), similarity-search
precision@k side by side, per model the metrics table, confusion matrix,
ROC/PR/reliability curves and Optuna history, a 2-D map of each table's
features and a gallery of misclassified held-out images, worst first.

The output folder opens from disk without a server::

    OUT/index.html  OUT/figures/*.png  OUT/thumbs/*.jpg  OUT/report.json

It is built in a hidden sibling folder and swapped into place at the end, so a
half-built report is never mistaken for a finished one; the next run removes
what a killed build left behind. Only a folder that the report itself wrote
(its ``.featurestore-report.json`` marker lists every file) is ever replaced:
see :mod:`pipelines.report.folder`.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click
import pandas as pd

from featurestore import FeatureStoreError, Store
from featurestore._io import utc_now
from pipelines.html import render_page
from pipelines.heads.leaderboard import read_leaderboard
from pipelines.report.compare import enrich_leaderboard, search_tables
from pipelines.report.data import (ImageLocator, ModelFacts, dataset_facts, error_ids,
                                   load_model_facts, table_lineages)
from pipelines.report.map import MAP_METHODS, check_map_method, table_map
from pipelines.report.sections import (Grid, StudyReader, comparison_sections,
                                       dataset_section, default_storage, leaderboard_grid,
                                       model_section)
from pipelines.report import figures
from pipelines.report.folder import check_out, finish, remove_stale, start_building

#: What the report covers and the seconds each part took.
SUMMARY_FILE = "report.json"


@dataclass
class ReportConfig:
    store: Path
    """Store folder to report on."""
    out: Path | None = None
    """Output folder; default ``STORE/report``. An existing folder is replaced only if it
    is empty or holds only an earlier report of this store (``pipelines.report.folder``)."""
    map: str = "tsne"
    """Second 2-D map beside PCA: ``tsne``, ``umap`` (needs umap-learn) or ``pca`` (PCA only)."""
    map_points: int = 20_000
    """Raw rows per table drawn in the PCA map (a random sample beyond that)."""
    map_sample: int = 3_000
    """Rows per table embedded by t-SNE/UMAP (a random sample of the mapped rows)."""
    gallery_size: int = 48
    """Misclassified held-out images shown per model, worst first."""
    storage: str | None = None
    """Optuna storage URL of the studies; default ``sqlite:///STORE/optuna.sqlite``."""
    seed: int = 0
    """Seed of the map samples and embeddings."""
    heatmaps: bool = False
    """Draw a heatmap (``featurestore explain``) beside each misclassified thumbnail; it
    builds each explainable model's backbone, so it costs seconds per model."""


def _check_config(config: ReportConfig) -> tuple[Store, Path]:
    check_map_method(config.map)
    for name in ("map_points", "map_sample", "gallery_size"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 0:
            raise FeatureStoreError(f"{name} must be an integer >= 0; got {value!r}.")
    store = Store(config.store, create=False)
    out = Path(config.out) if config.out is not None else store.paths.report
    check_out(out, store.root, own=out.resolve() == store.paths.report.resolve())
    return store, out


def run_report(config: ReportConfig, echo: Callable[[str], None] = print) -> Path:
    """Build the report and return the path of its ``index.html``."""
    store, out = _check_config(config)
    remove_stale(out)
    building = start_building(out, store.root)
    try:
        summary = _build(store, config, building, echo)
        render_page(building, "pipelines.report", "report.html", **summary.pop("context"))
        (building / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
        finish(building, out, store.root, echo)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    timings = ", ".join(f"{k} {v:.1f} s" for k, v in summary["seconds"].items())
    echo(f"Report: {out / 'index.html'} ({timings})")
    return out / "index.html"


class _Clock:
    """Seconds spent per part of the build, for the footer and the benchmark."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now


def _build(store: Store, config: ReportConfig, out: Path, echo) -> dict:
    clock = _Clock()
    models, notes = load_model_facts(store)
    lineages = table_lineages(store, models)
    tables = store.tables()
    context = {"store": str(store.root.resolve()), "notes": notes,
               "dataset": dataset_section(dataset_facts(store), tables, out)}
    clock.lap("dataset")
    board = enrich_leaderboard(read_leaderboard(store), lineages, models)
    context["leaderboard"] = leaderboard_grid(board)
    context["comparisons"] = comparison_sections(board, out)
    context["search"] = _search_section(store)
    clock.lap("leaderboard")
    echo(f"Report on {store.root}: {len(tables)} tables, {len(models)} models.")
    studies = StudyReader(default_storage(store, config.storage))
    with _locator(store, models) as locator:
        heatmaps = _heatmaps(store, out) if config.heatmaps else None
        context["models"] = [model_section(m, out, studies, locator, config.gallery_size,
                                           heatmaps) for m in models]
    clock.lap("models")
    context["maps"] = _map_sections(store, config, models, out, clock)
    context["seconds"] = dict(clock.seconds)
    context["generated_at"] = utc_now()
    return {"context": context, "store": str(store.root), "tables": [t.key for t in tables],
            "models": [m.name for m in models], "seconds": clock.seconds,
            "generated_at": context["generated_at"]}


def _heatmaps(store: Store, out: Path):
    from pipelines.explain.gallery import GalleryHeatmaps

    return GalleryHeatmaps(store, out)


def _search_section(store: Store) -> list[dict]:
    path = store.paths.search_eval
    if not path.exists():
        return []
    return [{"metric": metric, "grid": Grid.of(_flatten(table), index=True)}
            for metric, table in search_tables(pd.read_parquet(path))]


def _flatten(table: pd.DataFrame) -> pd.DataFrame:
    """(table, k) column pairs as ``name @k`` strings, for a one-row header."""
    return table.set_axis([f"{name} @{k}" for name, k in table.columns], axis=1)


def _locator(store: Store, models: list[ModelFacts]) -> ImageLocator:
    locator = ImageLocator(store)
    for key in sorted({m.ref.table_key for m in models if m.heldout is not None}):
        try:
            with store.open(key) as reader:
                locator.add_table_paths(reader.column("image_id"), reader.column("path"))
        except FeatureStoreError:
            continue  # table deleted since the model was fitted: the manifest may still know
    return locator


def _map_sections(store, config, models, out, clock) -> list[dict]:
    """One map per table, errors of the table's best whole-table head ringed in red."""
    sections = []
    for lineage in store.lineages():
        best = _best_model(lineage.key, models)
        with store.open(lineage) as reader:
            mapped = table_map(reader, error_ids(best) if best else set(), method=config.map,
                               max_points=config.map_points, sample=config.map_sample,
                               seed=config.seed)
        for name, seconds in mapped.seconds.items():
            part = f"maps: {name}"  # a part of "maps", so the benchmark can leave t-SNE out
            clock.seconds[part] = clock.seconds.get(part, 0.0) + seconds
        entry = {"table": lineage.key, "errors_from": best.name if best else None,
                 "n_errors": int(mapped.errors.sum()) if best else 0}
        if mapped.panels:
            entry["figure"] = figures.feature_map(
                mapped.panels, mapped.labels, mapped.errors, out, f"map-{lineage.key}",
                lineage.key)
        sections.append(entry)
    clock.lap("maps")
    return sections


def _best_model(table_key: str, models: list[ModelFacts]) -> ModelFacts | None:
    """The whole-table head of ``table_key`` with the best CV score (its ``model.json``)."""
    mine = [m for m in models if m.ref.table_key == table_key and not m.ref.view]
    if not mine:
        return None

    def score(model: ModelFacts) -> float:
        value = model.meta.get("cv_score")
        return float(value) if value is not None else float("-inf")

    return max(mine, key=score)


@click.command("report")
@click.option("--store", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Store folder.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder [default: STORE/report].")
@click.option("--map", "map_", type=click.Choice(MAP_METHODS), default="tsne",
              show_default=True, help="Second 2-D map beside PCA (umap needs umap-learn).")
@click.option("--map-points", type=click.IntRange(min=0), default=20_000, show_default=True,
              help="Raw rows per table in the PCA map.")
@click.option("--map-sample", type=click.IntRange(min=0), default=3_000, show_default=True,
              help="Rows per table embedded by t-SNE/UMAP.")
@click.option("--gallery-size", type=click.IntRange(min=0), default=48, show_default=True,
              help="Misclassified held-out images per model.")
@click.option("--storage", default=None,
              help="Optuna storage URL [default: sqlite:///STORE/optuna.sqlite].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--heatmaps", is_flag=True,
              help="Heatmaps beside the misclassified thumbnails (featurestore explain).")
def command(store, out, map_, map_points, map_sample, gallery_size, storage, seed, heatmaps):
    """Write a static HTML report: dataset, leaderboard, comparisons, curves, maps, errors."""
    config = ReportConfig(store=store, out=out, map=map_, map_points=map_points,
                          map_sample=map_sample, gallery_size=gallery_size, storage=storage,
                          seed=seed, heatmaps=heatmaps)
    try:
        run_report(config, echo=click.echo)
    except (FeatureStoreError, ValueError) as err:
        raise _CommandFailed(str(err)) from err


class _CommandFailed(click.ClickException):
    """A refused folder or bad option: ``Error: <message>``, exit status 2 like every command."""

    exit_code = 2
