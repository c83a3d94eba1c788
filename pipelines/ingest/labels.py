"""``featurestore label DECISIONS.csv --store STORE``: labels for inbox images, from a file.

The file (CSV or Parquet) has a row per image: ``image_id`` (or, where that is
empty, ``path``: a file whose bytes give the id, relative to the file's folder), ``label`` and
optionally ``split`` (``train``, ``val`` or ``test``; default ``train``). Each
row does what a labelled ingest of the same bytes does: the manifest's
``ingested`` row gets the label, split and ``labelled_at``, and readers
overlay them on the image's table rows, so the next fit trains on it.

Every row is checked before anything is written, and all are written in one
transaction: an unknown id or path, a class the store has never seen, a bad
split, two labels for one image or an image labelled otherwise already (a
label is changed through a view) is a one-line error naming the row, and no
label is attached.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click
import pandas as pd

from featurestore import FeatureStoreError, Store
from featurestore.splits import SPLITS
from pipelines.extract.run import EXIT_BAD_INPUT


@dataclass
class LabelConfig:
    """Settings of one ``label`` run."""

    decisions: Path
    """CSV or Parquet file: ``image_id`` or ``path``, ``label``, optional ``split``."""
    store: Path
    """Store whose inbox images get the labels."""


@dataclass
class LabelResult:
    labelled: list[str]
    """Image ids labelled now."""
    unchanged: int
    """Rows that asked for the label and split the image has already."""

    def summary(self) -> str:
        return (f"{len(self.labelled)} inbox image(s) labelled; {self.unchanged} had that "
                f"label already (nothing to do). The next fit-heads trains on them.")


def run_label(config: LabelConfig, echo: Callable[[str], None] = print) -> LabelResult:
    """Attach the labels of ``config.decisions``; all of them or, on any bad row, none."""
    store = Store(config.store, create=False)
    wanted = _read_decisions(Path(config.decisions), _known_classes(store))
    with store.manifest() as manifest:
        answer = manifest.attach_label_map({i: (lab, split) for i, (_, lab, split)
                                            in wanted.items()}, all_or_nothing=True)
    refused = [(wanted[i][0], why) for i, why in answer.items() if why]
    if refused:
        row, why = min(refused)
        raise FeatureStoreError(f"{config.decisions} row {row}: {why}; no label was attached.")
    labelled = list(answer)  # every reason is empty here
    echo(f"Labels from {config.decisions} attached in {store.root}.")
    return LabelResult(labelled, len(wanted) - len(labelled))


def _known_classes(store: Store) -> set[str]:
    with store.manifest() as manifest:
        labels = pd.concat([manifest.images()["label"], manifest.ingested()["label"]])
    return {str(label) for label in labels.dropna() if str(label)}


def _read_decisions(path: Path, classes: set[str]) -> dict[str, tuple[int, str, str]]:
    """``{image_id: (row number, label, split)}``; a one-line error for the first bad row."""
    from featurestore._io import hash_file

    if not path.is_file():
        raise FeatureStoreError(f"decisions file {path} not found.")
    frame = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else \
        pd.read_csv(path, dtype=str, keep_default_na=False)
    if not {"image_id", "path"} & set(frame.columns) or "label" not in frame.columns:
        raise FeatureStoreError(f"{path} needs columns image_id (or path) and label; it has "
                                f"{', '.join(map(str, frame.columns)) or 'none'}.")
    wanted: dict[str, tuple[int, str, str]] = {}
    for number, row in enumerate(frame.to_dict("records"), start=2):  # 1 is the header
        where = f"{path} row {number}"
        label, split = str(row["label"]).strip(), str(row.get("split") or "train").strip()
        if label not in classes:
            raise FeatureStoreError(f"{where}: unknown class {label!r}; the store's classes "
                                    f"are {', '.join(sorted(classes))}.")
        if split not in SPLITS:
            raise FeatureStoreError(f"{where}: split must be one of {', '.join(SPLITS)}; "
                                    f"got {split!r}.")
        image_id = str(row.get("image_id") or "").strip()
        if not image_id:  # the file's bytes name it
            file = (path.parent / str(row.get("path") or "").strip()).expanduser()
            if not file.is_file():
                raise FeatureStoreError(f"{where}: no image_id, and no file {file}.")
            image_id = hash_file(file)
        if image_id in wanted and wanted[image_id][1:] != (label, split):
            raise FeatureStoreError(f"{where}: image {image_id[:12]} is labelled "
                                    f"{wanted[image_id][1]!r} in row {wanted[image_id][0]} "
                                    f"already.")
        wanted.setdefault(image_id, (number, label, split))
    if not wanted:
        raise FeatureStoreError(f"{path} has no rows.")
    return wanted


class _CommandFailed(click.ClickException):
    exit_code = EXIT_BAD_INPUT


@click.command("label")
@click.argument("decisions", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--store", required=True, type=click.Path(file_okay=False, path_type=Path))
def command(decisions, store):
    """Label inbox images from a CSV/Parquet file (image_id or path, label, split).

    All rows are checked first; any bad row is an error and no label is attached.
    """
    try:
        result = run_label(LabelConfig(decisions=decisions, store=store), echo=click.echo)
    except (FeatureStoreError, ValueError) as err:
        raise _CommandFailed(str(err)) from err
    click.echo(result.summary())
