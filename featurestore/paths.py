"""Every file and folder name in a store, in one place.

::

    STORE/
      manifest.sqlite              every image: id (SHA-256 of its bytes), path, label, split
      tables/<key>/                one feature table per recipe
        lineage.json               the recipe
        hdf5/features.h5           chunked HDF5: one file per table
        parquet/part-000001.parquet ...   Parquet: one file per committed part
        pending/<writer>/          part writers (shards) not yet committed
        index/<metric>/            similarity index of the table
        near_duplicates.parquet    pairs found by near-duplicates
        projection.keras           derived (embedding) tables: the projection, verifier.json
      models/<key>/<head>[@<view>]/  fitted heads: model.json, model file, oof.parquet, heldout.parquet
      training/<key>/<head>/       checkpoints of end-to-end models in training (train-cnn, fine-tune)
      leaderboard.parquet          every head on every table (and view), compared
      optuna.sqlite                the searches (resumable)
      views.sqlite                 cleaned views: label decisions with who/when/why
      audits/<key>/<run>/          label-audit suspects and their gallery
      cache/tables/<key>/          features of images scored by predict, by content hash
      cache/openvino/<model>/      backbones converted for the openvino runtime, hash-checked
      extract_errors.sqlite        files that could not be extracted, and why
      search_eval.parquet          precision@k of every eval-search run
      report/index.html            the static HTML report
      ingested/<id>.<ext>          bytes of the images that ingest received, by content hash
      scores.sqlite                every ingested image scored by every saved model

Stages never spell these names: they ask ``store.paths`` (a :class:`StorePaths`).
The README's store diagram is checked against :data:`LAYOUT` by a test.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TABLES_DIR = "tables"
MANIFEST_FILE = "manifest.sqlite"
MODELS_DIR = "models"
LEADERBOARD_FILE = "leaderboard.parquet"
OPTUNA_FILE = "optuna.sqlite"
VIEWS_FILE = "views.sqlite"
AUDITS_DIR = "audits"
CACHE_DIR = "cache"
EXTRACT_ERRORS_FILE = "extract_errors.sqlite"
SEARCH_EVAL_FILE = "search_eval.parquet"
REPORT_DIR = "report"
OPENVINO_CACHE_DIR = "openvino"  # inside CACHE_DIR
TRAINING_DIR = "training"
INGESTED_DIR = "ingested"
SCORES_FILE = "scores.sqlite"

# Inside a table folder.
LINEAGE_FILE = "lineage.json"
PENDING_DIR = "pending"
INDEX_DIR = "index"
NEAR_DUPLICATES_FILE = "near_duplicates.parquet"
PROJECTION_FILE = "projection.keras"
VERIFIER_FILE = "verifier.json"

#: Top-level entries of a store, as the README's diagram names them.
LAYOUT = (MANIFEST_FILE, TABLES_DIR, MODELS_DIR, TRAINING_DIR, LEADERBOARD_FILE, OPTUNA_FILE,
          VIEWS_FILE, AUDITS_DIR, CACHE_DIR, EXTRACT_ERRORS_FILE, SEARCH_EVAL_FILE, REPORT_DIR,
          INGESTED_DIR, SCORES_FILE)


@dataclass(frozen=True)
class StorePaths:
    """The paths of one store rooted at ``root``; nothing is created here."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_FILE

    @property
    def tables(self) -> Path:
        return self.root / TABLES_DIR

    def table(self, key: str) -> Path:
        return self.tables / key

    @property
    def models(self) -> Path:
        return self.root / MODELS_DIR

    def models_of(self, key: str) -> Path:
        """Folder of the models fitted on table ``key``."""
        return self.models / key

    @property
    def training(self) -> Path:
        return self.root / TRAINING_DIR

    def training_of(self, key: str, head: str) -> Path:
        """Checkpoints of end-to-end model ``head`` (on table or image size ``key``) in training."""
        return self.training / key / head

    @property
    def leaderboard(self) -> Path:
        return self.root / LEADERBOARD_FILE

    @property
    def optuna(self) -> Path:
        return self.root / OPTUNA_FILE

    @property
    def optuna_url(self) -> str:
        """The default Optuna storage URL (SQLite beside the tables), absolute so that it
        names the same file from any working directory."""
        return f"sqlite:///{self.optuna.resolve()}"

    @property
    def views(self) -> Path:
        return self.root / VIEWS_FILE

    @property
    def audits(self) -> Path:
        return self.root / AUDITS_DIR

    def audits_of(self, key: str) -> Path:
        return self.audits / key

    @property
    def cache(self) -> Path:
        return self.root / CACHE_DIR

    @property
    def cache_tables(self) -> Path:
        """Root of the predict cache: a table folder per lineage, like ``tables/``."""
        return self.cache / TABLES_DIR

    @property
    def openvino_cache(self) -> Path:
        """Converted models of the openvino runtime, one checked folder per recipe."""
        return self.cache / OPENVINO_CACHE_DIR

    @property
    def extract_errors(self) -> Path:
        return self.root / EXTRACT_ERRORS_FILE

    @property
    def search_eval(self) -> Path:
        return self.root / SEARCH_EVAL_FILE

    @property
    def report(self) -> Path:
        return self.root / REPORT_DIR

    @property
    def ingested(self) -> Path:
        """Copies of the files ``ingest`` received, named ``<image_id><ext>``."""
        return self.root / INGESTED_DIR

    @property
    def scores(self) -> Path:
        return self.root / SCORES_FILE


def table_pending(table_dir: Path) -> Path:
    return Path(table_dir) / PENDING_DIR


def table_near_duplicates(table_dir: Path) -> Path:
    return Path(table_dir) / NEAR_DUPLICATES_FILE


def table_projection(table_dir: Path) -> Path:
    """The Keras projection of a derived table (its SHA-256 is in the lineage)."""
    return Path(table_dir) / PROJECTION_FILE


def table_verifier(table_dir: Path) -> Path:
    """A derived table's pair verifier: the calibrated distance-to-probability map."""
    return Path(table_dir) / VERIFIER_FILE
