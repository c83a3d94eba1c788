"""``featurestore predict IMAGES... --store STORE --model NAME``: score images with a saved head.

The model's own recipe runs end to end: each image's features come from, in
order,

1. the model's feature table (its raw row, when the image is in the dataset):
   those rows were extracted with exactly the model's lineage;
2. the predict cache ``STORE/cache/tables/<key>/``: a feature table of the same
   lineage, written by the store's own :class:`~featurestore.TableWriter`
   (one committed part per engine batch, deduplicated by image id);
3. a fresh extraction (:mod:`pipelines.extract.featurize`) with the lineage's backbone,
   weights, input size, preprocessing and pooling, appended to the cache.

Images are keyed by the SHA-256 of their bytes (the store's image id), so an
image is extracted once whatever its path, and a killed run keeps every batch
committed before the kill. Before any image is extracted (and whenever
``--weights`` is given), the weights that would compute the features are
checked against the lineage's SHA-256; a mismatch is refused with both hashes.

Output (CSV or Parquet, by the extension of ``--out``): one row per input file
with ``path``, ``image_id``, ``source`` (table, cache or extracted),
``proba_<label>`` per class, ``predicted`` (decided with the model's saved
threshold) and ``error`` (empty, or why the file could not be scored; such
rows have no probabilities).

Exit status: 0 every file scored; 3 some files failed (listed); 2 bad
arguments, unknown model, refused weights, or no file scored; 4 the cache or
``--out`` could not be written (disk full: ``pipelines.errors``); 1 anything else.
A file name that is not UTF-8 keeps its row, its path written with ``\\x`` escapes.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import pandas as pd
from PIL import UnidentifiedImageError
from tqdm.auto import tqdm

from classifiers.errors import ClassifierError
from featurestore import FeatureStoreError, Lineage, LineageMismatchError, Store, TableReader
from featurestore._io import atomic_write, remove_tmp_of, write_csv
from featurestore.layout import IMAGE_EXTENSIONS, display
from featurestore.scan import hash_file, inspect_image
from featurestore.tablefiles import LINEAGE_FILE
from pipelines.extract.engine import default_workers
from pipelines.extract.run import EXIT_BAD_INPUT, EXIT_FILE_ERRORS, EXIT_OK
from pipelines.heads.models import (PROBA_PREFIX, ModelRef, SavedModel, load_model,
                             resolve_model_name)

OUTPUT_FORMATS = (".csv", ".parquet")
SOURCES = ("table", "cache", "extracted")
#: Stored rows scored per block, bounding memory on large tables.
_BLOCK_ROWS = 4096
#: Below this many images to extract, one in-process engine beats spawning workers.
_MIN_IMAGES_PER_WORKER = 256


@dataclass
class PredictConfig:
    """Settings of one predict run."""

    inputs: Sequence[Path]
    """Image files and folders (folders are searched recursively for image extensions)."""
    store: Path
    """Store folder holding the model (and its feature table, if still there)."""
    model: str
    """Model name: ``<table>/<head>[@<view>]`` (``densenet121/max/logreg``) or a unique
    ``<head>[@<view>]`` (``pipelines.models.resolve_model_name``)."""
    out: Path = Path("predictions.csv")
    """Output file; ``.csv`` or ``.parquet``."""
    weights: str | None = None
    """Weights file of a lineage computed from a file (``file:<name>``); ``imagenet``
    lineages use Keras' cache unless a file is given. Checked against the lineage's SHA-256."""
    recompute: bool = False
    """Extract every image again, ignoring the table and the cache (new images are still
    added to the cache; cached rows are never rewritten)."""
    batch_size: int = 32
    """Images per backbone call."""
    workers: int | None = None
    """Backbone processes; None: one in-process engine for fewer than 256 images to
    extract, else one per core (at most 4; one on a GPU)."""
    progress: bool = True
    """Show a progress bar while extracting."""


@dataclass
class PredictResult:
    """What one predict run did."""

    frame: pd.DataFrame
    """One row per input file: path, image_id, source, proba_<label>..., predicted, error."""
    out: Path
    model: str
    classes: list[str]
    skipped: list[str] = field(default_factory=list)
    """Files in the input folders without an image extension (not scored)."""
    seconds: float = 0.0
    escaped_paths: int = 0
    """Input paths that are not valid UTF-8, written with ``\\x`` escapes (:func:`text_path`)."""

    @property
    def errors(self) -> list[tuple[str, str]]:
        """``(path, reason)`` of the files that could not be scored."""
        failed = self.frame[self.frame["error"] != ""]
        return list(zip(failed["path"], failed["error"]))

    @property
    def n_scored(self) -> int:
        return int((self.frame["error"] == "").sum())

    @property
    def exit_code(self) -> int:
        if not self.n_scored:
            return EXIT_BAD_INPUT
        return EXIT_FILE_ERRORS if self.errors else EXIT_OK

    def source_counts(self) -> dict[str, int]:
        """Scored files per feature source (``table``, ``cache``, ``extracted``)."""
        counts = Counter(self.frame.loc[self.frame["error"] == "", "source"])
        return {name: counts.get(name, 0) for name in SOURCES}

    def summary(self, max_errors: int = 10) -> str:
        scored = self.frame[self.frame["error"] == ""]
        per_label = scored["predicted"].value_counts()
        lines = [f"Scored {len(scored)} of {len(self.frame)} files with {self.model} in "
                 f"{self.seconds:.1f} s; predictions written to {self.out}."]
        lines.append("  images per predicted label: " + (", ".join(
            f"{label}: {int(per_label.get(label, 0))}" for label in self.classes)))
        lines.append("  features from: " + ", ".join(
            f"{name} {count}" for name, count in self.source_counts().items()))
        if self.skipped:
            lines.append(f"{len(self.skipped)} file(s) in the folders skipped (no image "
                         f"extension: {', '.join(IMAGE_EXTENSIONS)}).")
        if self.escaped_paths:
            lines.append(f"{self.escaped_paths} path(s) are not valid UTF-8; written with \\x "
                         f"escapes for the bytes that are not (as featurestore scan does).")
        errors = self.errors
        if errors:
            lines.append(f"{len(errors)} file(s) failed (error column of {self.out.name}):")
            lines += [f"  {path}: {reason}" for path, reason in errors[:max_errors]]
            if len(errors) > max_errors:
                lines.append(f"  ... and {len(errors) - max_errors} more")
        return "\n".join(lines)


def run_predict(config: PredictConfig, echo: Callable[[str], None] = print) -> PredictResult:
    """Score every image of ``config.inputs`` with the model; write and return the table."""
    started = time.perf_counter()
    _check_config(config)
    store = Store(config.store, create=False)
    ref = resolve_model_name(store, config.model)
    from pipelines.cnn.predict import is_end_to_end, run_predict_end_to_end

    if is_end_to_end(ref):  # train-cnn and fine-tune models score pixels, not features
        return run_predict_end_to_end(store, ref, config, echo, started)
    model = load_model(store, ref.table_key, ref.head, view=ref.view)
    settings = _engine_settings(model, ref, config) if config.weights is not None else None
    files, skipped = collect_images(config.inputs)
    if not files:
        raise FeatureStoreError(f"No image files (extensions {', '.join(IMAGE_EXTENSIONS)}) "
                                f"in {', '.join(map(str, config.inputs))}.")
    image_ids, unreadable = _hash_files(files)
    first_path: dict[str, Path] = {}
    for path, image_id in zip(files, image_ids):
        if image_id:
            first_path.setdefault(image_id, path)
    scores = {} if config.recompute else _stored_scores(store, model, set(first_path))
    todo = {image_id: path for image_id, path in first_path.items() if image_id not in scores}
    echo(f"Model {ref.name}: {len(files)} file(s), {len(first_path)} distinct image(s); "
         f"{len(first_path) - len(todo)} with stored features, {len(todo)} to extract.")
    failed = _unidentified(todo)
    todo = {image_id: path for image_id, path in todo.items() if image_id not in failed}
    if todo:
        settings = settings or _engine_settings(model, ref, config)
        _warn_versions(model.lineage, echo)
        extracted, undecoded = _extract(store, model, settings, todo, config)
        scores.update(extracted)
        failed.update(undecoded)
    frame = _frame(files, image_ids, {**unreadable, **failed}, scores, model)
    write_predictions(frame, config.out)
    return PredictResult(frame, Path(config.out), ref.name, [str(c) for c in model.classes],
                         skipped, time.perf_counter() - started,
                         escaped_paths=sum(text_path(p) != str(p) for p in files))


def _stored_scores(store: Store, model: SavedModel, wanted: set[str]) -> dict:
    """Scores of the images found in the model's table, then in the predict cache."""
    scores = score_table(store, model, wanted, "table")
    # The cache is a nested store (STORE/cache/tables/<key>/), read like the store itself.
    cache_root = store.paths.cache
    if cache_root.is_dir():
        scores.update(score_table(Store(cache_root, create=False), model,
                                   wanted - set(scores), "cache"))
    return scores


def _warn_versions(lineage: Lineage, echo) -> None:
    """Say when the libraries that will compute features differ from the lineage's."""
    from pipelines.extract.recipe import library_versions

    now = library_versions(lineage.precision, bool(lineage.augmentation))
    changed = {k: (v, now.get(k)) for k, v in lineage.library_versions.items()
               if now.get(k) != v}
    if changed:
        echo("Note: features are computed with other library versions than the model's "
             "table (" + ", ".join(f"{k} {now_v} vs {v}" for k, (v, now_v) in
                                   sorted(changed.items())) + "); expect small differences.")


def _check_config(config: PredictConfig) -> None:
    if not config.inputs:
        raise FeatureStoreError("inputs is empty; give image files or folders.")
    missing = [str(p) for p in config.inputs if not Path(p).exists()]
    if missing:
        raise FeatureStoreError(f"Input(s) not found: {', '.join(missing)}.")
    if Path(config.out).suffix.lower() not in OUTPUT_FORMATS:
        raise FeatureStoreError(f"out must end in {' or '.join(OUTPUT_FORMATS)}; "
                                f"got {str(config.out)!r}.")
    if not Path(config.out).parent.is_dir():  # a typo must not create folders
        raise FeatureStoreError(f"out folder {Path(config.out).parent} does not exist; "
                                f"create it first or choose another --out.")
    if config.batch_size < 1:
        raise FeatureStoreError(f"batch_size must be >= 1; got {config.batch_size}.")
    if config.workers is not None and config.workers < 1:
        raise FeatureStoreError(f"workers must be >= 1 (or None); got {config.workers}.")


def collect_images(inputs: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """Files to score, in input order (folders walked recursively, sorted), and skipped files.

    A file named on its own is always scored; inside folders only files with an
    image extension (``featurestore.layout.IMAGE_EXTENSIONS``) are, and hidden
    entries are ignored, as the scanner does.
    """
    files, skipped = [], []
    for item in map(Path, inputs):
        if not item.is_dir():
            files.append(item)
            continue
        for folder, dirs, names in os.walk(item):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(n for n in names if not n.startswith(".")):
                path = Path(folder) / name
                is_image = path.suffix.lower() in IMAGE_EXTENSIONS
                (files if is_image else skipped).append(path if is_image else str(path))
    return files, skipped


def _hash_files(files: list[Path]) -> tuple[list[str], dict[str, str]]:
    """Image id per file (``""`` when unreadable) and ``{path: reason}`` of unreadable files."""
    image_ids, errors = [], {}
    for path in files:
        try:
            image_ids.append(hash_file(path))
        except OSError as err:
            image_ids.append("")
            errors[str(path)] = f"cannot read: {err.strerror or err}"
    return image_ids, errors


def _unidentified(todo: dict[str, Path]) -> dict[str, str]:
    """``{image_id: reason}`` of files whose header Pillow cannot read.

    They are reported without starting the backbone, so a folder that keeps a
    broken file costs no model build on every rerun.
    """
    bad = {}
    for image_id, path in todo.items():
        try:
            inspect_image(path)
        except Exception as err:  # Pillow raises many types; each file fails alone
            bad[image_id] = "not an image" if isinstance(err, UnidentifiedImageError) else \
                f"cannot read: {type(err).__name__}: {err}"
    return bad


def _engine_settings(model: SavedModel, ref: ModelRef, config: PredictConfig):
    """Engine settings of the model's lineage; refuses weights that do not match it."""
    from pipelines.backbones.weights import random_seed
    from pipelines.extract.featurize import engine_settings_for  # imports the backbone registry

    lineage = model.lineage
    if config.weights is not None and random_seed(lineage.weights) is not None:
        raise LineageMismatchError(
            f"Model {ref.name} was fitted on features of randomly initialised weights "
            f"({lineage.weights}); --weights {config.weights} cannot reproduce them. "
            f"Leave --weights out.")
    try:
        return engine_settings_for(lineage, weights_path=config.weights,
                                   batch_size=config.batch_size,
                                   cache_dir=Store(config.store).paths.openvino_cache)
    except LineageMismatchError as err:
        raise LineageMismatchError(f"Refusing to score with model {ref.name}: {err} "
                                   f"Expected weights SHA-256 {lineage.weights_sha256}.") from err


def score_table(store: Store, model: SavedModel, wanted: set[str],
                 source: str) -> dict[str, tuple[np.ndarray, str]]:
    """``{image_id: (probabilities, source)}`` of the ``wanted`` images that have a raw
    row in ``store``'s table of the model's lineage."""
    if not wanted or not (store.table_dir(model.lineage) / LINEAGE_FILE).exists():
        return {}
    scores = {}
    with TableReader(store.table_dir(model.lineage)) as reader:
        model.check_table(reader)
        ids = reader.column("image_id")
        hit = pd.Series(ids).isin(wanted).to_numpy() & (reader.column("aug_id") == 0)
        rows = np.flatnonzero(hit)
        for start in range(0, rows.size, _BLOCK_ROWS):
            block = rows[start: start + _BLOCK_ROWS]
            proba = model.predict_proba(reader.read_features(block))
            scores.update((i, (p, source)) for i, p in zip(ids[block], proba))
    return scores


def _extract(store: Store, model: SavedModel, settings, todo: dict[str, Path],
             config: PredictConfig) -> tuple[dict, dict]:
    """Extract, score and cache ``{image_id: path}``; returns ``(scores, {image_id: reason})``.

    Every batch is committed to the cache as one part before the next is
    computed, so a killed run loses at most the batch in flight.
    """
    from pipelines.embedding.derived import projector_of
    from pipelines.extract.featurize import iter_feature_batches

    workers = config.workers or (
        1 if len(todo) < _MIN_IMAGES_PER_WORKER else default_workers(settings.runtime))
    workers = min(workers, max(1, len(todo) // config.batch_size))
    scores, failed = {}, {}
    bar = tqdm(total=len(todo), unit="img", disable=not config.progress,
               desc=f"predict {model.lineage.backbone}")
    cache = Store(store.paths.cache)
    project = projector_of(store, model.lineage)
    with bar, cache.writer(model.lineage, rows_per_part=config.batch_size) as writer:
        files = ((path, image_id) for image_id, path in todo.items())
        for batch in iter_feature_batches(files, model.lineage, settings, workers=workers):
            if batch.image_ids:
                batch.X = project(batch.X)  # a derived table's rows are projected features
                proba = model.predict_proba(batch.X)
                scores.update((i, (p, "extracted")) for i, p in zip(batch.image_ids, proba))
                _cache(writer, batch)
            failed.update((image_id, reason) for _, image_id, reason in batch.errors)
            bar.update(len(batch.image_ids) + len(batch.errors))
    return scores, failed


def text_path(path: str | os.PathLike) -> str:
    """``path`` as UTF-8 text: bytes of a file name that are not UTF-8 become ``\\xff``.

    A name such as ``b"scan\\xff.png"`` reaches Python as a surrogate escape, which
    neither UTF-8 CSV nor Parquet (nor the cache table) can hold, and which lost
    the whole run's output; the scanner writes such names the same way.
    """
    return display(os.fsencode(path))


def _cache(writer, batch) -> None:
    """Append the batch's images the cache lacks and commit them now."""
    new = ~writer.known([(image_id, 0) for image_id in batch.image_ids])
    if new.any():
        keep = np.flatnonzero(new)
        writer.append(batch.X[keep], image_id=[batch.image_ids[k] for k in keep],
                      path=[text_path(batch.paths[k]) for k in keep])
    writer.flush()


def _frame(files, image_ids, errors: dict[str, str], scores, model: SavedModel) -> pd.DataFrame:
    """One row per file; files that failed keep their row, without probabilities.

    ``errors`` maps a path (unreadable files) or an image id (undecodable) to the reason.
    """
    classes = [str(c) for c in model.classes]
    proba = np.full((len(files), len(classes)), np.nan)
    source, error = [""] * len(files), [""] * len(files)
    for k, image_id in enumerate(image_ids):
        reason = errors.get(str(files[k])) or errors.get(image_id)
        if reason or image_id not in scores:
            error[k] = reason or "not scored"
            continue
        proba[k], source[k] = scores[image_id]
    ok = np.array([not e for e in error], dtype=bool)
    predicted = np.full(len(files), "", dtype=object)
    if ok.any():
        predicted[ok] = [str(label) for label in model.decide(proba[ok])]
    frame = pd.DataFrame({"path": [text_path(p) for p in files], "image_id": image_ids,
                          "source": source})
    for k, label in enumerate(classes):
        frame[f"{PROBA_PREFIX}{label}"] = proba[:, k]
    frame["predicted"] = predicted.astype(str)
    frame["error"] = error
    return frame


def write_predictions(frame: pd.DataFrame, out: str | Path) -> None:
    """Write ``frame`` atomically as CSV (formula cells neutralised) or Parquet (raw values),
    by ``out``'s extension, into an existing folder."""
    out = Path(out)
    remove_tmp_of(out)  # what a killed earlier run left beside its output
    if out.suffix.lower() == ".parquet":
        atomic_write(out, lambda tmp: frame.to_parquet(tmp, index=False))
    else:
        write_csv(frame, out)


# -- command line ------------------------------------------------------------------


class _CommandFailed(click.ClickException):
    """Bad input, unknown model or refused weights: ``Error: <message>``, exit status 2."""

    exit_code = EXIT_BAD_INPUT


@click.command("predict")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--store", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Store folder holding the model.")
@click.option("--model", "model", required=True,
              help="Model name: densenet121/max/logreg, <table key>/<head>[@<view>], or a "
                   "unique <head>[@<view>].")
@click.option("--out", default="predictions.csv", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Output file, .csv or .parquet.")
@click.option("--weights", default=None,
              help="Weights file of the model's lineage (needed for file weights; imagenet "
                   "comes from Keras' cache). Its SHA-256 must match the lineage.")
@click.option("--recompute", is_flag=True,
              help="Extract every image again, ignoring stored features.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="Images per backbone call.")
@click.option("--workers", default=None, type=click.IntRange(min=1),
              help="Backbone processes [default: 1 below 256 images to extract, else one "
                   "per core, max 4].")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def command(inputs, store, model, out, weights, recompute, batch_size, workers, quiet):
    """Score image files (or folders of them) with a saved model, end to end.

    Features are computed with exactly the model's recipe (or read from the
    store when the image is already there) and cached, then the head and its
    saved threshold are applied. Exit status: 0 all scored; 3 some files
    failed (listed, and in the error column); 2 bad input, unknown model,
    refused weights or nothing scored; 4 the cache or --out could not be written.
    """
    config = PredictConfig(inputs=list(inputs), store=store, model=model, out=out,
                           weights=weights, recompute=recompute, batch_size=batch_size,
                           workers=workers, progress=not quiet)
    try:
        result = run_predict(config, echo=click.echo)
    except (FeatureStoreError, ClassifierError, ValueError) as err:
        raise _CommandFailed(str(err)) from err
    click.echo(result.summary())
    raise SystemExit(result.exit_code)
