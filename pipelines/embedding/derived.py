"""Derived tables: a parent table's rows through a saved projection.

A derived table's lineage is its parent's plus ``derived`` (the parent's key,
the projection's spec and the SHA-256 of ``projection.keras``), so its key and
name differ from the parent's and the two are never mixed (``concat``, heads
and their models check lineages). The projection file is checked against that
SHA-256 and loaded with Keras' ``safe_mode`` before any row is computed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import click
import numpy as np

from featurestore import FeatureStoreError, Lineage, Store
from featurestore._io import hash_file
from featurestore.paths import table_projection
from featurestore.tablefiles import table_formats

#: Rows projected (and appended) at a time: bounded memory for any table.
BATCH_ROWS = 4096


class UsageFailed(click.ClickException):
    """Bad input shown as ``Error: <message>``, exit status 2 like Click's own usage errors."""

    exit_code = 2


def parent_of(lineage: Lineage) -> Lineage:
    """The lineage of the table ``lineage`` was derived from (its fields less ``derived``)."""
    if not lineage.derived:
        raise FeatureStoreError(f"Table {lineage.name} ({lineage.key}) is not a derived table; "
                                f"give one made by `featurestore fit-embedding`.")
    parent = dataclasses.replace(lineage, derived=None)
    if parent.key != lineage.derived["parent_key"]:
        raise FeatureStoreError(
            f"Derived table {lineage.key} names parent {lineage.derived['parent_key']}, but its "
            f"recipe is that of {parent.key}; the lineage was edited.")
    return parent


def load_projection(store: Store, lineage: Lineage):
    """The derived table's Keras projection, after checking its file's SHA-256."""
    return load_projection_of(store.table_dir(lineage), lineage)


def load_projection_of(table_dir: Path, lineage: Lineage):
    """The Keras projection in derived table folder ``table_dir``, checked, in safe mode."""
    import keras

    path = table_projection(table_dir)
    if not path.is_file():
        raise FeatureStoreError(f"Derived table {lineage.key} has no projection file {path}; "
                                f"rerun `featurestore fit-embedding`.")
    sha = hash_file(path)
    if sha != lineage.derived["weights_sha256"]:
        raise FeatureStoreError(
            f"Projection {path} has SHA-256 {sha[:12]}..., but table {lineage.key} was computed "
            f"with {lineage.derived['weights_sha256'][:12]}...; refusing to use it.")
    return keras.saving.load_model(path, compile=False, safe_mode=True)


def project_into(store: Store, lineage: Lineage, model,
                 echo: Callable[[str], None] = print) -> int:
    """Append to derived table ``lineage`` every parent row it lacks; returns how many."""
    from classifiers.embedding.projection import project

    parent = parent_of(lineage)
    formats = tuple(table_formats(store.table_dir(parent))) or ("hdf5",)
    with store.open(parent) as reader, store.writer(lineage, formats=formats) as writer:
        meta = reader.metadata()
        missing = np.flatnonzero(~writer.known(zip(meta["image_id"], meta["aug_id"].tolist())))
        for start in range(0, len(missing), BATCH_ROWS):
            rows = missing[start:start + BATCH_ROWS]
            part = meta.iloc[rows]
            writer.append(project(model, reader.read_features(rows)),
                          image_id=part["image_id"], aug_id=part["aug_id"],
                          label=part["label"], split=part["split"], path=part["path"],
                          aug_params=part["aug_params"])
    echo(f"Derived table {lineage.name}: {len(missing)} row(s) projected from {parent.name}.")
    return int(len(missing))


def extend_derived(store: str | Store, derived_key: str,
                   echo: Callable[[str], None] = print) -> int:
    """Project the parent's rows that derived table ``derived_key`` lacks (after ``ingest``
    or ``extract`` added images); returns the number of rows added (0 when up to date)."""
    store = Store.of(store, create=False)
    lineage = store.resolve({"key": derived_key})
    parent_of(lineage)
    return project_into(store, lineage, load_projection(store, lineage), echo)


def featurize_for(table_dir: Path, lineage: Lineage, paths, *, weights_path: str | None = None,
                  cache_dir: Path | None = None):
    """``(X, image_ids, errors)`` of new image files in table ``lineage``'s feature space.

    The parent's recipe extracts them (see ``featurize_files``); for a derived
    table its projection then maps them, so a new image lands where its rows would.
    """
    from pipelines.extract.featurize import featurize_files

    if not lineage.derived:
        return featurize_files(paths, lineage, weights_path=weights_path, cache_dir=cache_dir)
    from classifiers.embedding.projection import project

    X, ids, errors = featurize_files(paths, parent_of(lineage), weights_path=weights_path,
                                     cache_dir=cache_dir)
    return project(load_projection_of(table_dir, lineage), X), ids, errors


def projector_of(store: Store, lineage: Lineage) -> Callable[[np.ndarray], np.ndarray]:
    """Maps the recipe's features of new images into ``lineage``'s table: its projection for
    a derived table, the identity for a table of images."""
    if not lineage.derived:
        return lambda X: X
    from classifiers.embedding.projection import project

    model = load_projection(store, lineage)
    return lambda X: project(model, X)


def derived_tables_of(store: Store, parent: Lineage) -> list[Lineage]:
    """Every derived table whose parent is ``parent``."""
    return [lin for lin in store.lineages()
            if lin.derived and lin.derived["parent_key"] == parent.key]
