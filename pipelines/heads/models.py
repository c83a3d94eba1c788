"""Fitted heads saved in the store, with the lineage of the features they were fitted on.

::

    STORE/models/<table_key>/<head>[@<view>]/
      model.json        lineage, table key, head, params, threshold, metrics,
                        library versions, SHA-256 of every file (written last)
      model.skops       scikit-learn heads (skops.io: trusted types only, no pickle), or
      model.ubj         XGBoost booster (UBJSON), or
      model.keras       Keras model
      oof.parquet       out-of-fold probabilities of the tuning split (written by fit-heads)
      oof-views.parquet the same folds' probabilities of the augmented views (tables with views)
      heldout.parquet   the refitted head's predictions on the held-out split (fit-heads)

A head fitted on a cleaned view of the table (``fit-heads --view NAME``) lives
beside the one fitted on the whole table, in ``<head>@<view>``. A model's
*name* is ``<table>/<head>[@<view>]``, where ``<table>`` is a key or any
lineage query (``densenet121/max/logreg``); :func:`resolve_model_name` also
accepts a bare ``<head>[@<view>]`` when exactly one table has such a model.

Each head writes and reads its own files (``HeadBase.save`` / ``load``), so
nothing here knows a format. A model folder is written as a unit and checked
before use (:mod:`pipelines.heads.model_folder`): every file is hash-checked,
pickles are refused, and the lineage in ``model.json`` must give its table
key. :meth:`SavedModel.check_table` refuses features of another lineage.
"""

from __future__ import annotations

import contextlib
import platform
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from classifiers.metrics import decide
from classifiers.registry import get_head_spec
from featurestore import FeatureStoreError, Lineage, LineageMismatchError, Store
from featurestore._io import TMP_PREFIX
from pipelines.heads.model_folder import (MODEL_JSON, check_all_files, checked_file,
                                          model_files, read_record, recover_aside,
                                          write_model_folder)

OOF_FILE = "oof.parquet"
#: Out-of-fold probabilities of the train images' augmented views (``aug_id`` column), for TTA.
OOF_VIEWS_FILE = "oof-views.parquet"
HELDOUT_FILE = "heldout.parquet"
#: Prefix of the per-class probability columns of oof.parquet, heldout.parquet and predict's output.
PROBA_PREFIX = "proba_"


def model_dir(store: str | Path | Store, table_key: str, head: str,
              view: str | None = None) -> Path:
    """Folder of head ``head`` fitted on table ``table_key`` (on view ``view`` if given)."""
    models = Store.of(store).paths.models_of(table_key)
    return models / (f"{head}@{view}" if view else head)


@dataclass(frozen=True)
class ModelRef:
    """Where one saved model lives; ``name`` is what ``--model`` accepts."""

    table_key: str
    head: str
    view: str | None
    path: Path

    @property
    def name(self) -> str:
        return f"{self.table_key}/{self.head}" + (f"@{self.view}" if self.view else "")


def list_models(store: str | Path | Store) -> list[ModelRef]:
    """Every saved model of the store (folders holding a ``model.json``), sorted by name."""
    refs = []
    for meta in sorted(Store.of(store, create=False).paths.models.glob(f"*/*/{MODEL_JSON}")):
        if meta.parent.name.startswith(TMP_PREFIX) or meta.parent.parent.name.startswith(TMP_PREFIX):
            continue  # a save in progress, or what a killed one left
        head, _, view = meta.parent.name.partition("@")
        refs.append(ModelRef(meta.parent.parent.name, head, view or None, meta.parent))
    return refs


def resolve_model_name(store: str | Path | Store, name: str) -> ModelRef:
    """The saved model called ``name``: ``<table>/<head>[@<view>]`` or a unique ``<head>[@<view>]``.

    ``<table>`` is a table key or a lineage query (``densenet121/max``), so
    ``densenet121/max/logreg`` names the logreg head of the max-pooled table.
    """
    store = store if isinstance(store, Store) else Store(store, create=False)
    refs = list_models(store)
    table, _, leaf = name.rpartition("/")
    head, _, view = leaf.partition("@")
    view = view or None
    candidates = [r for r in refs if r.head == head and r.view == view]
    if table:
        try:
            key = store.resolve(table).key
        except FeatureStoreError:
            key = table
        candidates = [r for r in candidates if r.table_key == key]
    if len(candidates) == 1:
        return candidates[0]
    known = ", ".join(r.name for r in refs) or "none"
    if not candidates:
        raise FeatureStoreError(f"No model named {name!r} in {store.root}. Models: {known}.")
    raise FeatureStoreError(f"Model name {name!r} is ambiguous in {store.root}: "
                            f"{', '.join(r.name for r in candidates)}. Add the table, e.g. "
                            f"{candidates[0].name}.")


def library_versions() -> dict[str, str]:
    """Versions of the libraries that fit and read the heads."""
    import optuna
    import skops
    import sklearn

    versions = {"python": platform.python_version(), "numpy": np.__version__,
                "scikit-learn": sklearn.__version__, "optuna": optuna.__version__,
                "skops": skops.__version__}
    with contextlib.suppress(ImportError):  # an optional extra (cpu or gpu)
        import xgboost

        versions["xgboost"] = xgboost.__version__
    if "keras" in sys.modules:
        versions["keras"] = sys.modules["keras"].__version__
        versions["keras_backend"] = sys.modules["keras"].backend.backend()
    if "tensorflow" in sys.modules:
        versions["tensorflow"] = sys.modules["tensorflow"].__version__
    return versions


@dataclass
class SavedModel:
    """A fitted head with the facts needed to use it safely."""

    estimator: Any
    """The fitted scikit-learn compatible head."""
    head: str
    table_key: str
    lineage: Lineage
    """Lineage of the feature table the head was fitted on."""
    threshold: float | None
    """Decision threshold on the positive class's probability (None: argmax)."""
    positive_class: str | None
    meta: dict = field(default_factory=dict)
    """Everything in ``model.json`` (params, metrics, versions, ...)."""

    @property
    def classes(self) -> np.ndarray:
        return self.estimator.classes_

    def check_table(self, table) -> None:
        """Refuse features of another recipe: ``table`` is a TableReader or a Lineage."""
        other = table if isinstance(table, Lineage) else getattr(table, "lineage", None)
        if not isinstance(other, Lineage):
            raise TypeError(
                f"table must be a TableReader or a Lineage; got {type(table).__name__}.")
        if other != self.lineage:
            fields = "; ".join(f"{k}: model {a!r} vs table {b!r}"
                               for k, (a, b) in self.lineage.diff(other).items())
            raise LineageMismatchError(
                f"Head {self.head!r} was fitted on features of table {self.table_key}; table "
                f"{other.key} has another lineage ({fields}). Fit the head on that table "
                f"instead (featurestore fit-heads --table {other.key}).")

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """``(n_samples, n_classes)`` probabilities in the order of :attr:`classes`."""
        return self.estimator.predict_proba(X)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Labels ``(n_samples,)`` decided with the saved threshold."""
        return self.decide(self.predict_proba(X))

    def decide(self, proba: np.ndarray) -> np.ndarray:
        """Labels ``(n_samples,)`` of probabilities ``(n_samples, n_classes)``, decided with
        the saved threshold on the positive class (argmax without one)."""
        return decide_labels(self, proba)


def decide_labels(model, proba: np.ndarray) -> np.ndarray:
    """``model``'s labels of ``proba``: any model with ``classes``, ``threshold`` and
    ``positive_class`` (a head's :class:`SavedModel`, an end-to-end model)."""
    positive = None if model.positive_class is None else \
        [str(c) for c in model.classes].index(str(model.positive_class))
    return model.classes[decide(proba, model.threshold, positive)]


#: ``write(path)`` writes one extra file of a model (oof.parquet, heldout.parquet) at ``path``.
FileWriter = Callable[[Path], None]


def save_model(store: str | Path | Store, estimator, *, head: str, lineage: Lineage,
               params: dict, threshold: float | None, positive_class: str | None,
               meta: dict | None = None, view: str | None = None,
               extra_files: Mapping[str, FileWriter] | None = None) -> Path:
    """Write a fitted head, its ``extra_files`` and its ``model.json`` as one unit.

    ``extra_files`` maps a file name to a function writing it (fit-heads
    passes ``oof.parquet`` and ``heldout.parquet``), so the predictions always
    belong to the model beside them. Returns the model folder.
    """
    folder = model_dir(store, lineage.key, head, view)

    def build(tmp: Path) -> dict:
        files = estimator.save(tmp)
        for name, write in (extra_files or {}).items():
            write(tmp / name)
        return {**(meta or {}),
                "head": head, "view": view, "table_key": lineage.key,
                "lineage": lineage.to_dict(), "params": params, "threshold": threshold,
                "positive_class": positive_class, "model_files": files,
                "fitted_state": estimator.fitted_state(),
                "library_versions": library_versions()}

    write_model_folder(folder, build)
    return folder


def load_model(store: str | Path | Store, table_key: str, head: str, *,
               table=None, view: str | None = None) -> SavedModel:
    """Load the head ``head`` fitted on table ``table_key`` (a key or a lineage query).

    ``view`` picks the head fitted on that cleaned view of the table.

    ``table`` (a TableReader or Lineage), when given, must have the model's
    lineage or :class:`~featurestore.LineageMismatchError` is raised. Before
    anything is read, every file ``model.json`` records is checked against its
    SHA-256 and must lie inside the folder, and the recorded lineage must give
    the table key: anything else raises :class:`FeatureStoreError`.
    """
    store = store if isinstance(store, Store) else Store(store, create=False)
    folder = model_dir(store, table_key, head, view)
    recover_aside(folder)
    if not (folder / MODEL_JSON).exists():
        # Not a key with a model: maybe a lineage query such as "densenet121/max".
        with contextlib.suppress(FeatureStoreError):
            folder = model_dir(store, store.resolve(table_key).key, head, view)
    if not (folder / MODEL_JSON).exists():
        known = ", ".join(ref.name for ref in list_models(store)) or "none"
        on_view = f" (view {view!r})" if view else ""
        raise FeatureStoreError(f"No model for head {head!r}{on_view} on table {table_key!r} "
                                f"in {store.root}. Models: {known}.")
    meta = read_record(folder)
    lineage = record_lineage(folder, meta)
    names = model_files(folder, meta)
    check_all_files(folder, meta)
    model = SavedModel(_read_estimator(folder, meta, names), meta["head"], meta["table_key"],
                       lineage, meta.get("threshold"), meta.get("positive_class"), meta)
    if table is not None:
        model.check_table(table)
    return model


def record_lineage(folder: Path, meta: dict) -> Lineage:
    """The lineage of ``model.json``, refused unless it gives the folder's and the record's key.

    The key is the hash of the lineage, so an edited lineage (another input
    size, another backbone) cannot pass for the table the head was fitted on.
    """
    where = Path(folder) / MODEL_JSON
    try:
        lineage = Lineage.from_dict(meta["lineage"])
        key = lineage.key
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise FeatureStoreError(f"{where}: the lineage is not readable ({err}); refusing it. "
                                f"Refit the head with `featurestore fit-heads`.") from err
    if key != meta["table_key"] or key != Path(folder).parent.name:
        raise FeatureStoreError(
            f"{where}: the recorded lineage gives table key {key}, but the model is filed "
            f"under table {Path(folder).parent.name} and records {meta['table_key']}; "
            f"refusing it (an edited model.json?). Refit the head with `featurestore fit-heads`.")
    head, _, view = Path(folder).name.partition("@")
    if meta["head"] != head or (meta.get("view") or "") != view:
        raise FeatureStoreError(f"{where} describes head {meta['head']!r} (view "
                                f"{meta.get('view')!r}), not the folder's {Path(folder).name!r}; "
                                f"refusing it.")
    return lineage


def _read_estimator(folder: Path, meta: dict, names: list[str]):
    try:
        cls = get_head_spec(meta["head"]).cls
        return cls.load(folder, names, meta.get("fitted_state") or {}, meta["params"])
    except Exception as err:
        raise FeatureStoreError(f"Cannot load the model in {folder}: {err}") from err


def prediction_file(folder: Path, name: str) -> Path | None:
    """``oof.parquet`` or ``heldout.parquet`` of the model in ``folder``, checked; None if absent.

    The file must be the one saved with this ``model.json`` (its SHA-256
    recorded there), so predictions of another fit are never read as this
    model's. A prediction file that ``model.json`` does not record is refused.
    """
    meta = read_record(folder)
    path = Path(folder) / name
    if name not in meta["files"] and not path.exists():
        return None
    if name not in meta["files"]:
        raise FeatureStoreError(f"{path} is not recorded in {Path(folder) / MODEL_JSON} (an "
                                f"older or interrupted save); refusing to use it. Refit the head "
                                f"with `featurestore fit-heads`.")
    return checked_file(folder, meta, name)
