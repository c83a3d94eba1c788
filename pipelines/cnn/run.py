"""``featurestore train-cnn``: the users' baseline, a small CNN trained from the store's images.

Trained on the manifest's train split (augmented with a store preset), val
for early stopping, learning-rate decay, the best-val_loss checkpoint and the
recall-floor threshold, test only for the final held-out report. Saved as
``STORE/models/images-<size>/cnn/`` and ranked on the leaderboard beside the
heads (table ``images/<size>``), so both sides are compared on the same
held-out split with the same metrics. ``--resume`` goes on from the best
checkpoint after a kill.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np

from classifiers.errors import ClassifierError
from classifiers.metrics import OBJECTIVES, make_objective
from featurestore import FeatureStoreError, Store
from pipelines.extract.augment import PRESETS
from pipelines.heads.fit import parse_class_weight

HEAD = "cnn"
MIN_IMAGE_SIZE = 16


@dataclass
class TrainCnnConfig:
    store: Path
    """Store folder with a scanned manifest (train, val and test images for every class)."""
    image_size: int = 150
    """Square input side in pixels (the users trained at 150 and 224)."""
    augment_preset: str | None = "base"
    """Augmentation of the training batches (``pipelines.extract.augment.PRESETS``); None: none."""
    epochs: int = 30
    """Most epochs; early stopping on val_loss usually ends sooner."""
    patience: int = 5
    """Epochs without a better val_loss before stopping (learning-rate halving after half)."""
    batch_size: int = 32
    learning_rate: float = 1e-3
    """Adam's initial learning rate."""
    filters: tuple[int, ...] = (32, 64, 128)
    """Filters of each conv/pool block."""
    dense_units: int = 128
    dropout: float = 0.5
    l1: float = 0.0
    """L1 penalty on the last layer's kernel."""
    l2: float = 0.0
    """L2 penalty on the last layer's kernel."""
    class_weight: str | dict | None = None
    """``balanced``, ``none``, ``{label: weight}`` or ``0:3,1:1``."""
    metric: str | None = None
    """Objective shown as the val score (``classifiers.metrics.OBJECTIVES``)."""
    positive_class: str | None = None
    min_recall: float | None = None
    """Recall floor of the positive class; the threshold is chosen on val."""
    seed: int = 0
    resume: bool = False
    """Continue from the best checkpoint of an interrupted run of the same recipe."""


@dataclass
class TrainCnnResult:
    name: str
    """The model's name for ``predict``/``report``: ``images-<size>/cnn``."""
    metrics: dict
    epochs: int
    seconds_per_epoch: float | None
    threshold: float | None


def image_key(size: int) -> str:
    return f"images-{size}"


def _check_config(config: TrainCnnConfig) -> None:
    if config.image_size < MIN_IMAGE_SIZE:
        raise FeatureStoreError(f"image_size must be at least {MIN_IMAGE_SIZE} px for "
                                f"{len(config.filters)} pooling blocks; got {config.image_size}.")
    if config.augment_preset is not None and config.augment_preset not in PRESETS:
        raise FeatureStoreError(f"Unknown augment preset {config.augment_preset!r}. "
                                f"Available: {', '.join(sorted(PRESETS))}, none.")
    for name in ("epochs", "batch_size", "patience"):
        if getattr(config, name) < 1:
            raise FeatureStoreError(f"{name} must be >= 1; got {getattr(config, name)}.")
    if config.l1 < 0 or config.l2 < 0 or not 0 <= config.dropout < 1:
        raise FeatureStoreError(f"l1 and l2 must be >= 0 and dropout in [0, 1); got l1 "
                                f"{config.l1}, l2 {config.l2}, dropout {config.dropout}.")


def keras_class_weight(value, classes) -> dict | None:
    """``{encoded class: weight}`` for Keras' ``fit`` from a ``--class-weight`` value."""
    weights = parse_class_weight(value)
    if weights is None:
        return None
    if weights == "balanced":
        return None  # resolved against the train labels by the caller
    unknown = sorted(set(weights) - {str(c) for c in classes})
    if unknown:
        raise FeatureStoreError(f"class_weight names labels {unknown} that the train split "
                                f"lacks; labels: {', '.join(map(str, classes))}.")
    return {k: float(weights.get(str(c), 1.0)) for k, c in enumerate(classes)}


def _balanced(y_enc: np.ndarray, n_classes: int) -> dict:
    from sklearn.utils.class_weight import compute_class_weight

    return dict(enumerate(compute_class_weight("balanced", classes=np.arange(n_classes),
                                               y=y_enc)))


def run_train_cnn(config: TrainCnnConfig, echo: Callable[[str], None] = print) -> TrainCnnResult:
    """Train, checkpoint, evaluate on test and save the CNN with its leaderboard row."""
    from pipelines.cnn import data, network, saved, training

    _check_config(config)
    started = time.perf_counter()
    store = Store(config.store, create=False)
    images, _ = data.manifest_rows(store)
    classes = data.check_splits(images)  # before any decoding
    objective = make_objective(config.metric, classes, positive_class=config.positive_class,
                               min_recall=config.min_recall)
    weights = keras_class_weight(config.class_weight, classes)
    splits = data.load_splits(store, config.image_size)
    for path, reason in splits.failed:
        echo(f"left out {path}: {reason}")
    train_split = splits.splits["train"]
    if parse_class_weight(config.class_weight) == "balanced":
        weights = _balanced(train_split.encoded(classes), len(classes))
    recipe = _recipe(config, splits)
    echo(f"train-cnn on {store.root}: {', '.join(f'{s} {n}' for s, n in recipe['rows'].items())}"
         f" images at {config.image_size} px, classes {', '.join(classes)}, augmentation "
         f"{config.augment_preset or 'none'}.")
    model = network.build_cnn(config.image_size, len(classes), filters=config.filters,
                              dense_units=config.dense_units, dropout=config.dropout,
                              l1=config.l1, l2=config.l2, learning_rate=config.learning_rate,
                              seed=config.seed)
    run = training.train(
        model, data.train_dataset(train_split, classes, batch_size=config.batch_size,
                                  preset=config.augment_preset, seed=config.seed),
        data.eval_dataset(splits.splits["val"], classes, batch_size=config.batch_size),
        work_dir=store.paths.training_of(image_key(config.image_size), HEAD), recipe=recipe,
        epochs=config.epochs, patience=config.patience, resume=config.resume,
        class_weight=weights, echo=echo)
    result = saved.evaluate(run.model, classes, splits.splits["val"], splits.splits["test"],
                            objective)
    timing = {"epochs": run.epochs, "sec_per_epoch": run.seconds_per_epoch,
              "train_sec": sum(run.epoch_seconds), "total_sec": time.perf_counter() - started}
    name = saved.save_end_to_end(store, run.model, key=image_key(config.image_size), head=HEAD,
                                 classes=classes, test=splits.splits["test"], result=result,
                                 objective=objective, recipe=recipe, lineage=None, timing=timing)
    echo(f"held-out (test) accuracy {result.metrics['accuracy']:.4f}, balanced accuracy "
         f"{result.metrics['balanced_accuracy']:.4f}; saved as {name}.")
    return TrainCnnResult(name, result.metrics, run.epochs, run.seconds_per_epoch,
                          result.threshold)


def _recipe(config: TrainCnnConfig, splits) -> dict:
    params = {k: v for k, v in asdict(config).items() if k not in ("store", "resume")}
    params["filters"] = list(config.filters)
    # None (Python) and "none" (the CLI) are one recipe, so either may resume the other's run.
    params["class_weight"] = str(parse_class_weight(config.class_weight))
    return {"table": f"images/{config.image_size}", "architecture": "cnn",
            "manifest_digest": splits.digest, "classes": [str(c) for c in splits.classes],
            "rows": {s: int(len(v.labels)) for s, v in splits.splits.items()},
            "params": params}


class _CommandFailed(click.ClickException):
    exit_code = 2


@click.command("train-cnn")
@click.option("--store", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Store folder (scanned).")
@click.option("--image-size", type=click.IntRange(min=MIN_IMAGE_SIZE), default=150,
              show_default=True, help="Square input side, e.g. 150 or 224.")
@click.option("--augment-preset", type=click.Choice(sorted(PRESETS) + ["none"]), default="base",
              show_default=True, help="Augmentation of the training batches.")
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--patience", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--lr", "learning_rate", type=click.FloatRange(min=0, min_open=True),
              default=1e-3, show_default=True, help="Adam's learning rate.")
@click.option("--l1", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--l2", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--class-weight", default="none", show_default=True,
              help="balanced, none, or label:weight pairs such as 0:3,1:1.")
@click.option("--metric", type=click.Choice(OBJECTIVES), default=None,
              help="Val score [default: recall_floor with --min-recall, else balanced_accuracy].")
@click.option("--positive-class", default=None, help="Label whose recall matters.")
@click.option("--min-recall", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Recall floor of the positive class (threshold chosen on val).")
@click.option("--seed", type=click.IntRange(0, 2**31 - 1), default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from the best checkpoint after a kill.")
def command(store, image_size, augment_preset, epochs, patience, batch_size, learning_rate,
            l1, l2, class_weight, metric, positive_class, min_recall, seed, resume):
    """Train a small CNN from the store's images and rank it beside the heads."""
    config = TrainCnnConfig(
        store=store, image_size=image_size,
        augment_preset=None if augment_preset == "none" else augment_preset, epochs=epochs,
        patience=patience, batch_size=batch_size, learning_rate=learning_rate, l1=l1, l2=l2,
        class_weight=class_weight, metric=metric, positive_class=positive_class,
        min_recall=min_recall, seed=seed, resume=resume)
    try:
        run_train_cnn(config, echo=click.echo)
    except (FeatureStoreError, ClassifierError, ValueError) as err:
        raise _CommandFailed(str(err)) from err
