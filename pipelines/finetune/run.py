"""``featurestore fine-tune``: the table's backbone with its saved Keras head on top, trained end to end.

Stacks the table's exact backbone recipe with the saved ``keras_dense`` head
(:mod:`pipelines.finetune.stack`), checks before any training that the stack
reproduces the head's saved held-out probabilities from raw images (the check
the users could not make when their fine-tuning collapsed to ~0.5), then
unfreezes one block (``--unfreeze conv5``), keeps BatchNormalization in
inference mode, recompiles with a low learning rate and trains on train,
early-stopped on val, evaluated on test. Saved as ``<table>/<head>+ft`` and
ranked on the leaderboard beside the head.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import pandas as pd

from classifiers.errors import ClassifierError
from classifiers.metrics import make_objective
from featurestore import FeatureStoreError, LineageMismatchError, Store
from pipelines.heads.model_folder import read_record
from pipelines.heads.models import (HELDOUT_FILE, load_model, prediction_file, record_lineage,
                                    resolve_model_name)

#: Heads that are Keras models and so can be stacked on the backbone.
KERAS_HEADS = ("keras_dense",)
SUFFIX = "+ft"


@dataclass
class FineTuneConfig:
    store: Path
    model: str
    """Saved Keras head, ``<table>/keras_dense`` (any name ``predict --model`` takes)."""
    unfreeze: str | None = "conv5"
    """Backbone layers whose names start with this are trained; ``none``: the head only."""
    epochs: int = 5
    learning_rate: float = 1e-5
    batch_size: int = 32
    patience: int = 3
    weights: str | None = None
    """The weights file of a table computed from ``file:<name>`` weights."""
    seed: int = 0
    resume: bool = False


@dataclass
class FineTuneResult:
    name: str
    reproduce_diff: float
    """Largest difference to the head's saved held-out probabilities before training."""
    head_val_accuracy: float
    """The head's (stacked, untrained) accuracy on val."""
    val_accuracy: list[float]
    """val_accuracy after each fine-tuning epoch."""
    metrics: dict
    seconds_per_epoch: float | None
    model: object = None
    """The fine-tuned Keras model (as saved)."""


def _saved_head(store: Store, name: str, weights: str | None):
    """``(ref, head, heldout frame, recipe)``; refuses what cannot be stacked before loading it."""
    ref = resolve_model_name(store, name)
    meta = read_record(ref.path)
    recipe = _recipe_of(record_lineage(ref.path, meta), weights)
    if meta.get("head") not in KERAS_HEADS:
        raise FeatureStoreError(f"Model {ref.name} is a {meta.get('head')!r} head, not a Keras "
                                f"head; fine-tune stacks a Keras head ({', '.join(KERAS_HEADS)}) "
                                f"on the backbone. Fit one with `featurestore fit-heads "
                                f"--heads keras_dense`.")
    model = load_model(store, ref.table_key, ref.head, view=ref.view)
    heldout = prediction_file(ref.path, HELDOUT_FILE)
    if heldout is None:
        raise FeatureStoreError(f"Model {ref.name} has no {HELDOUT_FILE} to check the stacked "
                                f"model against; refit it with `featurestore fit-heads`.")
    return ref, model, pd.read_parquet(heldout), recipe


def _recipe_of(lineage, weights: str | None):
    from pipelines.extract.recipe import Recipe

    try:
        return Recipe.from_lineage(lineage).with_weights_file(weights)
    except (LineageMismatchError, ValueError) as err:
        raise FeatureStoreError(f"Table {lineage.name}: {err}") from err
    except FileNotFoundError as err:
        raise FeatureStoreError(f"Table {lineage.name}: the weights file {err.filename} is "
                                f"missing.") from err


def run_fine_tune(config: FineTuneConfig, echo: Callable[[str], None] = print) -> FineTuneResult:
    """Check the stack reproduces the head, then fine-tune, evaluate on test and save."""
    from pipelines.cnn import data, saved, training
    from pipelines.cnn.network import compile_classifier
    from pipelines.finetune import stack

    started = time.perf_counter()
    store = Store(config.store, create=False)
    ref, head, heldout, recipe = _saved_head(store, config.model, config.weights)
    images, _ = data.manifest_rows(store)
    data.check_splits(images)  # before any decoding
    classes = np.asarray([str(c) for c in head.classes])
    splits = stack.preprocessed_splits(store, recipe)
    model, backbone, diff, head_val = _checked_stack(ref, head, heldout, recipe, splits, echo)
    val = splits.splits["val"]
    n_layers = stack.unfreeze(backbone, config.unfreeze)
    stack.check_inference_bn(backbone, splits.splits["train"].pixels[:8])
    compile_classifier(model, config.learning_rate)  # trainable flags take effect on compile
    echo(f"Training {n_layers} backbone layers ({config.unfreeze}) and the head at "
         f"learning rate {config.learning_rate:g}.")
    head_name = ref.head + SUFFIX
    run_recipe = _run_recipe(config, ref, recipe, head.lineage.name, splits)
    run = training.train(
        model, data.train_dataset(splits.splits["train"], classes, batch_size=config.batch_size,
                                  preset=None, seed=config.seed),
        data.eval_dataset(val, classes, batch_size=config.batch_size),
        work_dir=store.paths.training_of(ref.table_key, head_name), recipe=run_recipe,
        epochs=config.epochs, patience=config.patience, resume=config.resume, echo=echo)
    objective = _objective_of(head, classes)
    result = saved.evaluate(run.model, classes, val, splits.splits["test"], objective)
    timing = {"epochs": run.epochs, "sec_per_epoch": run.seconds_per_epoch,
              "train_sec": sum(run.epoch_seconds), "total_sec": time.perf_counter() - started}
    name = saved.save_end_to_end(store, run.model, key=ref.table_key, head=head_name,
                                 classes=classes, test=splits.splits["test"], result=result,
                                 objective=objective, recipe=run_recipe,
                                 lineage=head.lineage.to_dict(), timing=timing)
    echo(f"held-out (test) accuracy {result.metrics['accuracy']:.4f}; saved as {name}.")
    return FineTuneResult(name, diff, head_val, run.history["val_accuracy"].tolist(),
                          result.metrics, run.seconds_per_epoch, run.model)


def _checked_stack(ref, head, heldout, recipe, splits, echo):
    """``(model, backbone, reproduce diff, head val accuracy)``: the stack, checked untrained."""
    from pipelines.cnn.saved import predict_pixels
    from pipelines.finetune import stack

    classes = np.asarray([str(c) for c in head.classes])
    model, backbone = stack.stack(recipe, head.lineage, head.estimator.model_)
    check = next(s for s in (splits.splits["test"], splits.splits["val"])
                 if set(s.image_ids) & set(heldout["image_id"]))
    diff = stack.check_reproduces(model, check.pixels, check.image_ids, heldout, classes,
                                  ref.name)
    val = splits.splits["val"]
    head_val = float(np.mean(predict_pixels(model, val.pixels).argmax(1)
                             == val.encoded(classes)))
    echo(f"Stacked {recipe.backbone} + {ref.name}: reproduces the saved held-out "
         f"probabilities within {diff:.1e}; head val accuracy {head_val:.4f}.")
    return model, backbone, diff, head_val


def _run_recipe(config: FineTuneConfig, ref, recipe, table: str, splits) -> dict:
    return {"table": table, "architecture": f"{recipe.backbone}+{ref.head}",
            "source_model": ref.name, "manifest_digest": splits.digest,
            "rows": {s: int(len(v.labels)) for s, v in splits.splits.items()},
            "params": {"unfreeze": config.unfreeze, "learning_rate": config.learning_rate,
                       "batch_size": config.batch_size, "epochs": config.epochs,
                       "patience": config.patience, "seed": config.seed}}


def _objective_of(head, classes):
    """The head's own objective (``recall_floor@0.95``: its floor too), for the same rules."""
    name, _, floor = str(head.meta.get("objective") or "").partition("@")
    return make_objective(name or None, classes, positive_class=head.positive_class,
                          min_recall=float(floor) if floor else None)


class _CommandFailed(click.ClickException):
    exit_code = 2


@click.command("fine-tune")
@click.option("--store", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Store folder.")
@click.option("--model", required=True, help="Saved Keras head, e.g. densenet121/max/keras_dense.")
@click.option("--unfreeze", default="conv5", show_default=True,
              help="Train backbone layers whose names start with this (none: the head only).")
@click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--lr", "learning_rate", type=click.FloatRange(min=0, min_open=True),
              default=1e-5, show_default=True, help="Adam's learning rate (keep it low).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--patience", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--weights", default=None, help="Weights file of a table computed from a file.")
@click.option("--seed", type=click.IntRange(0, 2**31 - 1), default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from the best checkpoint after a kill.")
def command(store, model, unfreeze, epochs, learning_rate, batch_size, patience, weights, seed,
            resume):
    """Fine-tune a table's backbone with its saved Keras head, after checking the stack."""
    config = FineTuneConfig(store=store, model=model, unfreeze=unfreeze, epochs=epochs,
                            learning_rate=learning_rate, batch_size=batch_size,
                            patience=patience, weights=weights, seed=seed, resume=resume)
    try:
        run_fine_tune(config, echo=click.echo)
    except (FeatureStoreError, ClassifierError, ValueError) as err:
        raise _CommandFailed(str(err)) from err
