"""``featurestore ingest PATHS... --store STORE``: new scans enter the store, once, everywhere.

Each file is keyed by the SHA-256 of its bytes; an image the store already has
is a no-op (reported as such). A new one is copied into ``STORE/ingested/``,
gets its raw row in every table (extracted with exactly that table's recipe),
every index of those tables learns it, and every saved model on those tables
scores it into ``STORE/scores.sqlite`` (``featurestore scores``). Without
``--label`` it lands in the ``inbox`` split, which training, cross-validation,
evaluation and audits never read, until a labelled ingest of the same bytes
gives it its label ("labelled": readers overlay the label on its table rows, so
the next fit trains on it; an image labelled otherwise already is refused, since
labels are changed through views). Safe to run concurrently and to rerun after
a kill (see :mod:`pipelines.ingest.session`).

Exit status: 0 every file ingested (or already there); 3 some files failed
(listed); 2 bad arguments or no file ingested; 4 the store could not be written.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import click

from featurestore import FeatureStoreError
from pipelines.extract.run import EXIT_BAD_INPUT, EXIT_FILE_ERRORS, EXIT_OK
from pipelines.heads.predict import collect_images, text_path
from pipelines.ingest.session import IngestSession, Outcome, check_label


@dataclass
class IngestConfig:
    """Settings of one ingest run."""

    paths: Sequence[Path]
    """Image files and folders (folders searched recursively for image extensions)."""
    store: Path
    """Store folder with at least one table."""
    label: str | None = None
    """Label of every image; None: unlabelled, into the ``inbox`` split."""
    split: str | None = None
    """``train``, ``val`` or ``test`` for labelled images (default ``train``)."""
    tables: Sequence[str] | None = None
    """Table queries to extend; None: every table of the store."""
    models: Sequence[str] | None = None
    """Model names to score with; None: every saved model on those tables."""
    lock_timeout: float = 60.0
    """Seconds to wait for a table that another process is writing."""


@dataclass
class IngestResult:
    """What one ingest run did: one :class:`Outcome` per input file."""

    outcomes: list[Outcome]
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def errors(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.error]

    @property
    def exit_code(self) -> int:
        if len(self.errors) == len(self.outcomes):
            return EXIT_BAD_INPUT
        return EXIT_FILE_ERRORS if self.errors else EXIT_OK

    def summary(self) -> str:
        new, labelled = (sum(o.new for o in self.outcomes),
                         sum(o.labelled for o in self.outcomes))
        known = len(self.outcomes) - new - labelled - len(self.errors)
        lines = [f"Ingested {len(self.outcomes)} file(s) in {self.seconds:.1f} s: {new} new, "
                 f"{labelled} labelled, {known} already in the store (nothing to do), "
                 f"{len(self.errors)} failed."]
        lines += [f"  {o.path}: {o.error}" for o in self.errors]
        if self.skipped:
            lines.append(f"{len(self.skipped)} file(s) in the folders skipped (no image "
                         f"extension).")
        return "\n".join(lines)


def run_ingest(config: IngestConfig, echo: Callable[[str], None] = print) -> IngestResult:
    """Ingest every image of ``config.paths``; see the module docstring."""
    started = time.perf_counter()
    if not config.paths:
        raise FeatureStoreError("paths is empty; give image files or folders.")
    missing = [str(p) for p in config.paths if not Path(p).exists()]
    if missing:
        raise FeatureStoreError(f"Input(s) not found: {', '.join(missing)}.")
    check_label(config.label, config.split)
    session = IngestSession.open(config.store, tables=config.tables, models=config.models,
                                 lock_timeout=config.lock_timeout)
    files, skipped = collect_images(config.paths)
    if not files:
        raise FeatureStoreError(f"No image files in {', '.join(map(str, config.paths))}.")
    echo(f"{len(files)} file(s) into {len(session.lineages)} table(s), scored by "
         f"{len(session.refs)} model(s).")
    outcomes = session.ingest([(f, text_path(f)) for f in files], label=config.label,
                              split=config.split)
    return IngestResult(outcomes, skipped, time.perf_counter() - started)


class _CommandFailed(click.ClickException):
    exit_code = EXIT_BAD_INPUT


def _names(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


@click.command("ingest")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--store", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--label", default=None, help="Label of the images [default: none, the inbox].")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default=None,
              help="Split of labelled images [default: train].")
@click.option("--tables", default=None, help="Comma-separated table queries [default: all].")
@click.option("--models", default=None,
              help="Comma-separated model names [default: every model on those tables].")
@click.option("--lock-timeout", default=60.0, show_default=True, type=click.FloatRange(0),
              help="Seconds to wait for a table another process is writing.")
def command(paths, store, label, split, tables, models, lock_timeout):
    """Add new images to the store: extracted for every table, scored by every model.

    An image already in the store (same bytes) is a no-op. Without --label the
    images go to the inbox split, never used for training or evaluation.
    """
    config = IngestConfig(paths=list(paths), store=store, label=label, split=split,
                          tables=_names(tables), models=_names(models),
                          lock_timeout=lock_timeout)
    try:
        result = run_ingest(config, echo=click.echo)
    except (FeatureStoreError, ValueError) as err:
        raise _CommandFailed(str(err)) from err
    click.echo(result.summary())
    raise SystemExit(result.exit_code)
