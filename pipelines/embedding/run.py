"""``featurestore fit-embedding``: a projection learned on a table's rows, as a derived table.

Trains :mod:`classifiers.embedding` on the table's train rows (through a cleaned
view if asked, on some classes only if asked), in batches of P classes x K
source images with the augmented views as extra positives. Every row of the
parent table (all splits, unseen classes too) is then projected into the derived
table, and a pair verifier is calibrated on the validation rows, which the
manifest keeps apart from the training rows image by image (views included).
Rerunning the same command resumes: it projects only rows still missing.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from classifiers.embedding.sampler import check_classes
from classifiers.errors import ClassifierError
from featurestore import FeatureArrays, FeatureStoreError, Lineage, Store
from featurestore._io import atomic_write_text, hash_file
from featurestore.lineage import derived_spec
from featurestore.paths import table_projection, table_verifier
from featurestore.views import ViewStore, apply_view
from pipelines.embedding.derived import (UsageFailed, derived_tables_of, load_projection,
                                         project_into)


@dataclass
class FitEmbeddingConfig:
    store: Path
    """Store folder."""
    table: str
    """The parent table's query, e.g. ``densenet121/avg``, or its key."""
    loss: str = "triplet"
    """``triplet`` or ``contrastive``."""
    dim: int = 128
    """Width of the embedding."""
    epochs: int = 20
    mining: str = "semi-hard"
    """``semi-hard`` or ``hard`` online negative mining."""
    view: str | None = None
    """Train on this cleaned view's labels (see ``audit-labels --apply``)."""
    labels: tuple[str, ...] | None = None
    """Train on these classes only; every class is projected (the others are unseen)."""
    hidden: tuple[int, ...] = ()
    """Hidden layer widths; ``()`` for a linear projection."""
    p: int = 16
    """Classes per batch."""
    k: int = 4
    """Images per class per batch."""
    learning_rate: float = 1e-4
    seed: int = 0
    calibration_splits: tuple = field(default=("val", "test", ("val", "test")))
    """The first of these splits (or sets of splits) with same- and different-class pairs
    calibrates the verifier; never ``train``, whose rows the projection learned from."""


@dataclass
class FitEmbeddingResult:
    lineage: Lineage
    rows_added: int
    seconds_per_epoch: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    verifier: dict | None = None
    resumed: bool = False


def run_fit_embedding(config: FitEmbeddingConfig,
                      echo: Callable[[str], None] = print) -> FitEmbeddingResult:
    """Train (or resume) the projection of ``config.table`` and write its derived table."""
    from classifiers.embedding.projection import ProjectionSpec, fit_projection

    store = Store(config.store, create=False)
    parent = store.resolve(config.table)
    if parent.derived:
        raise FeatureStoreError(f"Table {parent.name} is itself derived; fit the embedding on "
                                f"its parent {parent.derived['parent_key']}.")
    view = ViewStore(store).get(config.view) if config.view else None
    with store.open(parent) as reader:
        arrays = _training_rows(reader.to_numpy(split="train"), view, config.labels)
    extra = {"split": "train", "labels": sorted(config.labels) if config.labels else None,
             "view": view.name if view else None, "view_digest": view.digest if view else None}
    spec = ProjectionSpec(dim=config.dim, hidden=config.hidden, loss=config.loss,
                          mining=config.mining, epochs=config.epochs, p=config.p, k=config.k,
                          learning_rate=config.learning_rate, seed=config.seed, extra=extra)
    for lineage in derived_tables_of(store, parent):
        if lineage.derived["projection"] == spec.to_dict() and \
                table_projection(store.table_dir(lineage)).is_file():
            echo(f"Resuming derived table {lineage.key}: same parent and projection.")
            added = project_into(store, lineage, load_projection(store, lineage), echo)
            verifier = None if table_verifier(store.table_dir(lineage)).is_file() else \
                calibrate(store, lineage, config.calibration_splits)
            return FitEmbeddingResult(lineage, added, verifier=verifier, resumed=True)
    echo(f"Table {parent.key}: {len(arrays.y)} train rows, {len(set(arrays.groups))} images, "
         f"{len(set(arrays.y))} classes; {spec.loss} loss, {spec.mining} mining, "
         f"{spec.p} x {spec.k} per batch.")
    model, seconds, losses = fit_projection(arrays.X, arrays.y, arrays.groups, spec, echo)
    lineage = _save_projection(store, parent, spec, model)
    added = project_into(store, lineage, model, echo)
    verifier = calibrate(store, lineage, config.calibration_splits)
    echo(f"Verifier: distance threshold {verifier['threshold']:.3f}, ROC AUC "
         f"{verifier['roc_auc']:.3f} on {verifier['n_pairs']} {verifier['split']} pairs.")
    return FitEmbeddingResult(lineage, added, seconds, losses, verifier)


def _training_rows(arrays: FeatureArrays, view, labels) -> FeatureArrays:
    if view is not None:
        arrays, _ = apply_view(arrays, view)
    if labels:
        unknown = sorted(set(labels) - set(arrays.y.tolist()))
        if unknown:
            raise FeatureStoreError(f"labels {unknown} have no train rows; the table's train "
                                    f"labels are {sorted(set(arrays.y.tolist()))}.")
        keep = np.isin(arrays.y, list(labels))
        arrays = FeatureArrays(*(a[keep] for a in arrays))
    if not len(arrays.y):
        raise FeatureStoreError("The table has no train rows to learn an embedding from.")
    check_classes(arrays.y, arrays.groups)  # before any work, not deep in the sampler
    return arrays


def _save_projection(store: Store, parent: Lineage, spec, model) -> Lineage:
    """Save the model into its derived table's folder; the folder's key needs its SHA-256."""
    with tempfile.TemporaryDirectory(prefix=".tmp-embedding-", dir=store.root) as tmp:
        path = Path(tmp) / "projection.keras"
        model.save(path)
        lineage = derived_spec(parent, spec.to_dict(), hash_file(path))
        table_dir = store.table_dir(lineage)
        table_dir.mkdir(parents=True, exist_ok=True)
        os.replace(path, table_projection(table_dir))
    return lineage


def calibrate(store: Store, lineage: Lineage, splits) -> dict:
    """Fit and save the derived table's :class:`PairVerifier` on the first usable split."""
    from classifiers.embedding.verifier import PairVerifier, pair_distances, sample_pairs

    problems = []
    with store.open(lineage) as reader:
        for split in splits:
            X, y, _, groups = reader.to_numpy(split=split, aug="raw")
            try:
                i, j, same = sample_pairs(y, groups, seed=0)
                verifier = PairVerifier.fit(pair_distances(X[i], X[j]), same)
            except ClassifierError as err:
                problems.append(f"{_split_name(split)}: {err}")
                continue
            record = {**verifier.to_dict(), "split": _split_name(split)}
            atomic_write_text(table_verifier(store.table_dir(lineage)),
                              json.dumps(record, indent=2))
            return record
    raise FeatureStoreError(f"No split to calibrate the verifier of {lineage.key} on "
                            f"(the table is written; verify needs it): {'; '.join(problems)}")


def _split_name(split) -> str:
    return split if isinstance(split, str) else "+".join(split)


@click.command("fit-embedding")
@click.option("--store", required=True, type=click.Path(path_type=Path), help="Store folder.")
@click.option("--table", required=True, help="Parent table: a query or key, e.g. densenet121/avg.")
@click.option("--loss", type=click.Choice(["triplet", "contrastive"]), default="triplet",
              show_default=True)
@click.option("--dim", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--mining", type=click.Choice(["semi-hard", "hard"]), default="semi-hard",
              show_default=True)
@click.option("--view", default=None, help="Train on a cleaned view's labels.")
@click.option("--labels", default=None, help="Train on these classes only (comma-separated).")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True)
def command(store, table, loss, dim, epochs, mining, view, labels, seed):
    """Learn an embedding on TABLE's stored features and write it as a derived table."""
    chosen = tuple(s.strip() for s in labels.split(",") if s.strip()) if labels else None
    config = FitEmbeddingConfig(store=store, table=table, loss=loss, dim=dim, epochs=epochs,
                                mining=mining, view=view, labels=chosen, seed=seed)
    try:
        result = run_fit_embedding(config, echo=click.echo)
    except (FeatureStoreError, ClassifierError, ValueError) as err:
        raise UsageFailed(str(err)) from err
    click.echo(f"Derived table {result.lineage.name} ({result.lineage.key}).")
