"""``featurestore extract DATASET --store STORE``: backbone features into feature tables.

:func:`run_extract` is the Python entry point; :data:`command` is the thin
Click layer over it. One run:

1. checks every setting and resolves the weights into a
   :class:`~pipelines.extract.recipe.Recipe` (fails here, before any image is
   read, when ImageNet weights are neither cached nor downloadable);
2. reads the store's manifest (scanning DATASET first if the store has none);
3. without ``--shard``, merges finished shard parts into the tables;
4. plans the ``(image_id, aug_id)`` rows missing from the tables;
5. runs the backbone once per view and reduces its final feature map by every
   requested pooling, writing one table per pooling (``pipelines.extract.engine``);
6. records files that fail in the errors table (``pipelines.extract.errors``)
   and goes on.

Exit status of the command: 0 all views extracted; 3 finished, but some files
could not be decoded (listed in ``STORE/extract_errors.sqlite`` and in the
summary, files changed since the scan among them); 2 bad arguments, or
weights that cannot be found or do not fit; 4 the store could not be written
(disk full, quota, read-only: ``pipelines.errors``); 1 anything else, a killed
worker included. A killed run is resumed by running the same command again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

import click
from tqdm.auto import tqdm

from featurestore import FeatureStoreError, Store
from featurestore.formats import FORMATS
from featurestore.paths import table_pending
from featurestore.splits import SPLITS
from featurestore.store import parse_shard
from pipelines.extract.augment import PRESETS
from pipelines.backbones.registry import POOLS, list_backbones
from pipelines.extract.engine import PRECISIONS, default_workers, run_engine
from pipelines.extract.errors import ErrorLog
from pipelines.extract.plan import Plan, make_plan
from pipelines.extract.images import DEFAULT_MAX_PIXELS
from pipelines.extract.recipe import Recipe
from pipelines.extract.runtimes import RUNTIMES

POOL_CHOICES = ("max", "avg", "both")
#: ``--format`` choices: each registered table format alone, or ``both`` (all of them).
FORMAT_CHOICES = {**{name: (name,) for name in FORMATS}, "both": tuple(FORMATS)}
EXIT_OK, EXIT_FILE_ERRORS, EXIT_BAD_INPUT = 0, 3, 2
#: ``local`` (this machine's processes) or ``ray`` (Ray Data, ``pipelines.extract.ray_engine``).
ENGINES = ("local", "ray")


@dataclasses.dataclass
class ExtractConfig:
    """Settings of one extract run."""

    dataset: Path
    """Image folder; must be the folder the store's manifest was scanned from."""
    store: Path
    """Feature store folder (created, and DATASET scanned into it, if new)."""
    backbone: str = "densenet121"
    """Registered backbone name (``pipelines.backbones.list_backbones()``)."""
    pool: str = "both"
    """``max``, ``avg`` or ``both`` (one backbone pass, two tables)."""
    weights: str = "imagenet"
    """``imagenet`` (Keras' download and cache), ``none`` (seeded random) or a weights file."""
    image_size: int | None = None
    """Square input side; None uses the backbone's default (224 for DenseNet121)."""
    augment: int = 0
    """Augmented views per image of the augmented splits (0: raw images only)."""
    augment_preset: str = "mild"
    """``mild`` or ``strong`` (``pipelines.augment.PRESETS``)."""
    augment_splits: tuple[str, ...] = ("train",)
    """Splits whose images get augmented views; the others get the raw view only."""
    seed: int = 0
    """Seed of the augmented views and of ``weights="none"`` initialisation."""
    batch_size: int = 32
    """Views per backbone call; every call has this shape (the last is padded)."""
    format: str = "hdf5"
    """``hdf5``, ``parquet`` or ``both``."""
    shard: str | None = None
    """``"K/N"``: extract only shard K of N into part files, merged by a run without shard."""
    workers: int | None = None
    """Backbone processes: None picks 1 on an accelerator or for the openvino runtime (one
    stream per core), else one per core (at most 4)."""
    precision: str = "float32"
    """``float32``, or ``bfloat16`` compute (faster on CPUs with AVX-512 BF16 / AMX)."""
    runtime: str | None = None
    """What runs the backbone (``pipelines.extract.runtimes``): None picks ``openvino`` on a
    CPU-only machine when it is installed and runs the recipe, else ``keras``."""
    rows_per_part: int = 1024
    """Rows per committed table part: at most this many views are recomputed after a kill."""
    commit_seconds: float | None = 60.0
    """A part is also committed once its oldest row has waited this long (None: rows only),
    so a slow run killed early keeps its work."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Files with more pixels than this are refused (errors table) without decoding."""
    progress: bool = True
    """Show a progress bar with images/s and ETA."""
    engine: str = "local"
    """:data:`ENGINES` name: ``ray`` reads, decodes and embeds on a Ray cluster."""
    ray_address: str | None = None
    """Ray engine: ``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``; None starts a local cluster."""
    actors: int = 2
    """Ray engine: backbone actors."""
    gpus_per_actor: float = 0.0
    """Ray engine: GPUs each actor reserves."""

    @property
    def pools(self) -> tuple[str, ...]:
        return POOLS if self.pool == "both" else (self.pool,)


@dataclasses.dataclass
class ExtractResult:
    """What one run did; ``summary()`` is the text the command prints."""

    tables: dict[str, str]
    """``{pool: table key}``."""
    images: int
    views_total: int
    views_skipped: int
    views_written: int
    errors: list[tuple[str, str]]
    """``(path, reason)`` of the files that failed in this run."""
    seconds: float
    workers: int
    shard: str | None = None
    merged: dict = dataclasses.field(default_factory=dict)
    duplicate_paths: int = 0

    @property
    def exit_code(self) -> int:
        return EXIT_FILE_ERRORS if self.errors else EXIT_OK

    @property
    def views_per_second(self) -> float:
        return self.views_written / self.seconds if self.seconds else 0.0

    def summary(self, max_errors: int = 10) -> str:
        lines = [f"Extracted {self.views_written} views in {self.seconds:.1f} s "
                 f"({self.views_per_second:.1f} img/s, {self.workers} worker(s)"
                 f"{', shard ' + self.shard if self.shard else ''}); "
                 f"{self.views_skipped} of {self.views_total} views were already stored."]
        lines += [f"  {pool:>3}: {key}" for pool, key in self.tables.items()]
        if self.merged.get("rows"):
            lines.append(f"Merged {self.merged['rows']} rows from shard parts first.")
        if self.duplicate_paths:
            lines.append(f"{self.duplicate_paths} manifest paths share bytes with an earlier "
                         f"path and were stored once.")
        if self.errors:
            lines.append(f"{len(self.errors)} file(s) failed (see extract_errors.sqlite):")
            lines += [f"  {path}: {reason}" for path, reason in self.errors[:max_errors]]
            if len(self.errors) > max_errors:
                lines.append(f"  ... and {len(self.errors) - max_errors} more")
        return "\n".join(lines)


def run_extract(config: ExtractConfig) -> ExtractResult:
    """Extract the missing rows of every requested pooling's table."""
    _check_config(config)
    if config.engine == "ray" and config.ray_address:
        from pipelines.extract.ray_engine import check_reachable

        check_reachable(config.ray_address)  # before a scan, not after it
    recipe = Recipe.from_config(config)
    store = Store(config.store)
    manifest = _manifest_for(store, config)
    lineages = recipe.lineages()
    merged = {} if config.shard else _merge_shards(store, lineages, config.engine)
    workers = config.workers or default_workers(recipe.runtime)
    with contextlib.ExitStack() as stack:
        writers = {pool: stack.enter_context(store.writer(
            lin, formats=FORMAT_CHOICES[config.format], shard=config.shard,
            rows_per_part=config.rows_per_part, commit_seconds=config.commit_seconds))
            for pool, lin in lineages.items()}
        plan = make_plan(manifest.images(), manifest.absolute_path,
                         [w.existing_keys() for w in writers.values()],
                         views=config.augment, augment_splits=config.augment_splits,
                         shard=config.shard)
        errors_log = stack.enter_context(ErrorLog(store, [lin.key for lin in lineages.values()]))
        workers = min(workers, max(1, len(plan.tasks)))
        written, errors, seconds = 0, [], 0.0
        if plan.tasks and config.engine == "ray":
            written, errors, seconds = _execute_ray(config, recipe, plan, writers, errors_log)
            workers = config.actors
        elif plan.tasks:
            written, errors, seconds = _execute(config, recipe, plan, writers, errors_log,
                                                workers)
    if config.engine == "ray":  # the actors' parts, once the table writers are closed
        _merge_shards(store, lineages, config.engine)
    return ExtractResult(
        tables={pool: lin.key for pool, lin in lineages.items()}, images=plan.images,
        views_total=plan.views_total, views_skipped=plan.views_done, views_written=written,
        errors=errors, seconds=seconds, workers=workers,
        shard=config.shard, merged=merged, duplicate_paths=plan.duplicate_paths)


def _execute(config, recipe: Recipe, plan: Plan, writers, errors_log, workers):
    """Run the engine over the plan; append rows, record errors.

    Returns ``(views written, [(path, reason)], seconds since the models were ready)``.
    """
    settings = recipe.engine_settings(config.batch_size,
                                      cache_dir=Store(config.store).paths.openvino_cache)
    existing = {pool: w.existing_keys() for pool, w in writers.items()}
    bar = tqdm(total=plan.views_todo, unit="img", disable=not config.progress,
               desc=f"extract {recipe.backbone}", smoothing=0.05)
    written, errors, ready = 0, [], [time.perf_counter()]

    def on_ready():  # time (and the bar's rate) from the first image, not the model build
        ready[0] = time.perf_counter()
        bar.reset(total=plan.views_todo)

    with bar:
        for result in run_engine(settings, plan.tasks, workers=workers, on_ready=on_ready):
            if result.rows:
                for pool, writer in writers.items():
                    _append(writer, existing[pool], result.rows, result.features[pool])
            errors_log.clear(row.path for row in result.rows)
            errors_log.record(result.errors)
            errors += [(path, reason) for path, _, reason in result.errors]
            written += len(result.rows)
            bar.update(len(result.rows))
            if result.errors:
                bar.set_postfix(errors=len(errors))
    return written, errors, time.perf_counter() - ready[0]


def _execute_ray(config, recipe: Recipe, plan: Plan, writers, errors_log):
    from pipelines.extract import ray_engine

    formats = next(iter(writers.values())).formats
    with tqdm(total=plan.views_todo, unit="img", disable=not config.progress,
              desc=f"extract {recipe.backbone} on ray", smoothing=0.05) as bar:
        return ray_engine.execute(config, recipe, plan, formats, errors_log, bar.update)


def _append(writer, existing: set, rows, features) -> None:
    """Append the rows this table lacks (a crash may leave the tables one part apart)."""
    keep = [i for i, row in enumerate(rows) if (row.image_id, row.aug_id) not in existing]
    if not keep:
        return
    kept = [rows[i] for i in keep]
    writer.append(features=features[keep], image_id=[r.image_id for r in kept],
                  aug_id=[r.aug_id for r in kept], label=[r.label for r in kept],
                  split=[r.split for r in kept], path=[r.path for r in kept],
                  aug_params=[r.aug_params for r in kept])
    existing.update((r.image_id, r.aug_id) for r in kept)


def _check_config(config: ExtractConfig) -> None:
    """Validate the run's own arguments (the recipe's are checked by ``Recipe``)."""
    _one_of("pool", config.pool, POOL_CHOICES)
    _one_of("format", config.format, FORMAT_CHOICES)
    if config.augment < 0:
        raise ValueError(f"augment must be >= 0 views; got {config.augment}.")
    unknown = set(config.augment_splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"augment_splits must be among {', '.join(SPLITS)}; "
                         f"got {sorted(unknown)}.")
    if config.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {config.batch_size}.")
    if config.commit_seconds is not None and not config.commit_seconds > 0:
        raise ValueError(f"commit_seconds must be > 0 (or None); got {config.commit_seconds}.")
    if config.workers is not None and config.workers < 1:
        raise ValueError(f"workers must be >= 1 (or None for automatic); got {config.workers}.")
    if config.shard is not None:
        parse_shard(config.shard)
    _one_of("engine", config.engine, ENGINES)
    if config.engine == "ray" and config.shard is not None:
        raise ValueError("shard splits the work by hand; engine ray plans the whole manifest "
                         "and spreads it over the cluster: give one or the other.")
    if config.actors < 1:
        raise ValueError(f"actors must be >= 1; got {config.actors}.")
    if not config.gpus_per_actor >= 0:
        raise ValueError(f"gpus_per_actor must be >= 0; got {config.gpus_per_actor}.")


def _one_of(name, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}.")


def _manifest_for(store: Store, config: ExtractConfig):
    """The store's manifest, scanning DATASET first when the store has none."""
    dataset = Path(config.dataset)
    if not store.manifest_path.exists():
        from pipelines.scan import ScanConfig, run_scan

        run_scan(ScanConfig(dataset=dataset, store=store.root, progress=config.progress))
    manifest = store.manifest()
    if not dataset.is_dir():
        raise FeatureStoreError(f"Dataset folder {dataset} does not exist.")
    if manifest.root is not None and Path(manifest.root) != dataset.resolve():
        raise FeatureStoreError(
            f"Store {store.root} was scanned from {manifest.root}, not {dataset.resolve()}; "
            f"use another store for another dataset.")
    return manifest


def _merge_shards(store: Store, lineages: dict, engine: str = "local") -> dict:
    """Merge finished shard parts of these tables (a run without --shard is the commit)."""
    if engine == "ray":
        from pipelines.extract.ray_engine import commit_parts

        return commit_parts(store, lineages)
    total = {"rows": 0, "duplicates": 0, "merged": []}
    for lin in lineages.values():
        if table_pending(store.table_dir(lin)).is_dir():
            summary = store.commit(lin)
            total["rows"] += summary["rows"]
            total["duplicates"] += summary["duplicates"]
            total["merged"] += summary["merged"]
    return total


# -- command line ------------------------------------------------------------------


class _CommandFailed(click.ClickException):
    """Bad input or unusable weights: ``Error: <message>``, exit status 2."""

    exit_code = EXIT_BAD_INPUT


@click.command("extract")
@click.argument("dataset", type=click.Path(file_okay=False, path_type=Path))
@click.option("--store", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Feature store folder (DATASET is scanned into it if it has no manifest).")
@click.option("--backbone", default="densenet121", show_default=True,
              type=click.Choice(list_backbones()), help="Registered backbone.")
@click.option("--pool", default="both", show_default=True, type=click.Choice(POOL_CHOICES),
              help="Global pooling; 'both' runs the backbone once and writes two tables.")
@click.option("--weights", default="imagenet", show_default=True,
              help="'imagenet' (Keras download/cache), 'none' (seeded random) or a "
                   ".weights.h5/.h5 file for this backbone.")
@click.option("--image-size", type=click.IntRange(min=1), default=None,
              help="Square input size [default: the backbone's, 224 for densenet121].")
@click.option("--augment", default=0, show_default=True, type=click.IntRange(min=0),
              help="Augmented views per training image (aug_id 1..N; 0 is the raw image).")
@click.option("--augment-preset", default="mild", show_default=True,
              type=click.Choice(sorted(PRESETS)), help="Augmentation ranges.")
@click.option("--augment-split", "augment_splits", multiple=True, default=("train",),
              show_default=True, type=click.Choice(list(SPLITS)),
              help="Split(s) to augment; repeat the option for several.")
@click.option("--seed", default=0, show_default=True,
              help="Seed of the augmented views and of --weights none.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="Views per backbone call.")
@click.option("--format", "format_", default="hdf5", show_default=True,
              type=click.Choice(list(FORMAT_CHOICES)), help="Table file format(s).")
@click.option("--shard", default=None, metavar="K/N",
              help="Extract shard K of N into part files; a run without --shard merges them.")
@click.option("--workers", default=None, type=click.IntRange(min=1),
              help="Backbone processes [default: 1 on a GPU/TPU or for openvino (a stream per "
                   "core), else one per core, max 4].")
@click.option("--precision", default="float32", show_default=True,
              type=click.Choice(list(PRECISIONS)),
              help="bfloat16: faster on CPUs with AVX-512 BF16/AMX; features differ slightly.")
@click.option("--runtime", default=None, type=click.Choice(list(RUNTIMES)),
              help="What runs the backbone [default: openvino on a CPU-only machine where it "
                   "is installed and converts the backbone, else keras].")
@click.option("--commit-seconds", default=60.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="Also commit a part once its oldest row has waited this long.")
@click.option("--engine", default="local", show_default=True, type=click.Choice(ENGINES),
              help="local: this machine's processes; ray: Ray Data on a Ray cluster.")
@click.option("--ray-address", default=None, metavar="auto|HOST:PORT|ray://HOST:PORT",
              help="Ray cluster to join [default: start a single-node one on this machine].")
@click.option("--actors", default=2, show_default=True, type=click.IntRange(min=1),
              help="Ray engine: backbone actors.")
@click.option("--gpus-per-actor", default=0.0, show_default=True,
              type=click.FloatRange(min=0), help="Ray engine: GPUs each actor reserves.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def command(dataset, store, backbone, pool, weights, image_size, augment, augment_preset,
            augment_splits, seed, batch_size, format_, shard, workers, precision, runtime,
            commit_seconds, engine, ray_address, actors, gpus_per_actor, quiet):
    """Extract backbone features of the images in DATASET into feature tables in STORE.

    Rerunning the same command extracts only the missing rows (after a crash or
    kill too). Exit status: 0 done; 3 done, but some files failed (listed, and
    kept in STORE/extract_errors.sqlite); 2 bad arguments or unusable weights;
    4 the store could not be written (disk full): free space and rerun.
    """
    config = ExtractConfig(
        dataset=dataset, store=store, backbone=backbone, pool=pool, weights=weights,
        image_size=image_size, augment=augment, augment_preset=augment_preset,
        augment_splits=tuple(augment_splits), seed=seed, batch_size=batch_size,
        format=format_, shard=shard, workers=workers, precision=precision, runtime=runtime,
        commit_seconds=commit_seconds, engine=engine, ray_address=ray_address, actors=actors,
        gpus_per_actor=gpus_per_actor, progress=not quiet)
    try:
        result = run_extract(config)
    except (FeatureStoreError, ValueError) as err:
        raise _CommandFailed(str(err)) from err
    click.echo(result.summary())
    raise SystemExit(result.exit_code)
