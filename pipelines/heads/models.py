"""Fitted heads saved in the store, with the lineage of the features they were fitted on.

::

    STORE/models/<table_key>/<head>[@<view>]/
      model.json        lineage, table key, head, params, threshold, metrics,
                        library versions, SHA-256 of every file (written last)
      model.ubj         XGBoost booster (UBJSON), or
      model.keras       Keras model, or
      model.joblib      other scikit-learn heads (a pickle: its SHA-256 is checked before loading)
      oof.parquet       out-of-fold probabilities of the tuning split (written by fit-heads)
      heldout.parquet   the refitted head's predictions on the held-out split (fit-heads)

A head fitted on a cleaned view of the table (``fit-heads --view NAME``) lives
beside the one fitted on the whole table, in ``<head>@<view>``. A model's
*name* is ``<table>/<head>[@<view>]``, where ``<table>`` is a key or any
lineage query (``densenet121/max/logreg``); :func:`resolve_model_name` also
accepts a bare ``<head>[@<view>]`` when exactly one table has such a model.

Native formats are used where the library has one, so loading an XGBoost or
Keras head never unpickles anything. ``model.json`` is written last and
atomically: a folder without it holds no model. :func:`load_model` refuses a
model whose files changed since they were written, and
:meth:`SavedModel.check_table` refuses features of another lineage.
"""

from __future__ import annotations

import contextlib
import json
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import joblib
import numpy as np

from featurestore import FeatureStoreError, Lineage, LineageMismatchError, Store
from featurestore._io import atomic_write, atomic_write_text
from featurestore.scan import hash_file
from classifiers.metrics import decide
from classifiers.registry import create_head

MODELS_DIR = "models"
MODEL_JSON = "model.json"
OOF_FILE = "oof.parquet"
HELDOUT_FILE = "heldout.parquet"
#: Prefix of the per-class probability columns of oof.parquet, heldout.parquet and predict's output.
PROBA_PREFIX = "proba_"
_NATIVE_FILES = {"ubj": "model.ubj", "keras": "model.keras"}
_PICKLE_FILE = "model.joblib"


def model_dir(store_root: str | Path, table_key: str, head: str,
              view: str | None = None) -> Path:
    """Folder of head ``head`` fitted on table ``table_key`` (on view ``view`` if given)."""
    return Path(store_root) / MODELS_DIR / table_key / (f"{head}@{view}" if view else head)


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


def list_models(store_root: str | Path) -> list[ModelRef]:
    """Every saved model of the store (folders holding a ``model.json``), sorted by name."""
    refs = []
    for meta in sorted((Path(store_root) / MODELS_DIR).glob(f"*/*/{MODEL_JSON}")):
        head, _, view = meta.parent.name.partition("@")
        refs.append(ModelRef(meta.parent.parent.name, head, view or None, meta.parent))
    return refs


def resolve_model_name(store: str | Path | Store, name: str) -> ModelRef:
    """The saved model called ``name``: ``<table>/<head>[@<view>]`` or a unique ``<head>[@<view>]``.

    ``<table>`` is a table key or a lineage query (``densenet121/max``), so
    ``densenet121/max/logreg`` names the logreg head of the max-pooled table.
    """
    store = store if isinstance(store, Store) else Store(store, create=False)
    refs = list_models(store.root)
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
    import sklearn
    import xgboost

    versions = {"python": platform.python_version(), "numpy": np.__version__,
                "scikit-learn": sklearn.__version__, "xgboost": xgboost.__version__,
                "optuna": optuna.__version__, "joblib": joblib.__version__}
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
        positive = None if self.positive_class is None else \
            [str(c) for c in self.classes].index(str(self.positive_class))
        return self.classes[decide(self.predict_proba(X), self.threshold, positive)]


def save_model(store_root: str | Path, estimator, *, head: str, lineage: Lineage,
               params: dict, threshold: float | None, positive_class: str | None,
               meta: dict | None = None, view: str | None = None) -> Path:
    """Write a fitted head and its ``model.json``; returns the model folder."""
    folder = model_dir(store_root, lineage.key, head, view)
    folder.mkdir(parents=True, exist_ok=True)
    fmt = getattr(estimator, "native_format", None)
    if fmt == "ubj":
        name = _NATIVE_FILES[fmt]
        atomic_write(folder / name, lambda tmp: estimator.booster_.save_model(str(tmp)))
    elif fmt == "keras":
        name = _NATIVE_FILES[fmt]
        atomic_write(folder / name, lambda tmp: estimator.model_.save(str(tmp)))
    else:
        name = _PICKLE_FILE
        atomic_write(folder / name, lambda tmp: joblib.dump(estimator, tmp))
    for stale in set(_NATIVE_FILES.values()) | {_PICKLE_FILE}:
        if stale != name and (folder / stale).exists():
            (folder / stale).unlink()
    record = {
        **(meta or {}),
        "head": head, "view": view, "table_key": lineage.key, "lineage": lineage.to_dict(),
        "params": params, "threshold": threshold, "positive_class": positive_class,
        "format": fmt or "joblib", "model_file": name,
        "fitted_state": estimator.fitted_state() if fmt else None,
        "files": {name: hash_file(folder / name)},
        "library_versions": library_versions(),
    }
    atomic_write_text(folder / MODEL_JSON, json.dumps(record, indent=2, default=_json_default))
    return folder


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"Cannot store {type(value).__name__} in model.json")


def load_model(store: str | Path | Store, table_key: str, head: str, *,
               table=None, view: str | None = None) -> SavedModel:
    """Load the head ``head`` fitted on table ``table_key`` (a key or a lineage query).

    ``view`` picks the head fitted on that cleaned view of the table.

    ``table`` (a TableReader or Lineage), when given, must have the model's
    lineage or :class:`~featurestore.LineageMismatchError` is raised. Every
    file's SHA-256 is checked against ``model.json`` before it is read.
    """
    store = store if isinstance(store, Store) else Store(store, create=False)
    folder = model_dir(store.root, table_key, head, view)
    if not (folder / MODEL_JSON).exists():
        # Not a key with a model: maybe a lineage query such as "densenet121/max".
        with contextlib.suppress(FeatureStoreError):
            folder = model_dir(store.root, store.resolve(table_key).key, head, view)
    if not (folder / MODEL_JSON).exists():
        known = ", ".join(ref.name for ref in list_models(store.root)) or "none"
        on_view = f" (view {view!r})" if view else ""
        raise FeatureStoreError(f"No model for head {head!r}{on_view} on table {table_key!r} "
                                f"in {store.root}. Models: {known}.")
    try:
        meta = json.loads((folder / MODEL_JSON).read_text())
    except (OSError, ValueError) as err:
        raise FeatureStoreError(f"Cannot read {folder / MODEL_JSON}: {err}") from err
    _verify_files(folder, meta)
    lineage = Lineage.from_dict(meta["lineage"])
    model = SavedModel(_read_estimator(folder, meta), head, meta["table_key"], lineage,
                       meta.get("threshold"), meta.get("positive_class"), meta)
    if table is not None:
        model.check_table(table)
    return model


def _verify_files(folder: Path, meta: dict) -> None:
    for name, expected in meta.get("files", {}).items():
        path = folder / name
        found = hash_file(path) if path.exists() else "missing"
        if found != expected:
            raise FeatureStoreError(
                f"{path} does not match the SHA-256 recorded in {MODEL_JSON} (expected "
                f"{expected[:16]}..., found {found[:16]}...); refusing to load it. Refit the "
                f"head with `featurestore fit-heads`.")


def _read_estimator(folder: Path, meta: dict):
    path = folder / meta["model_file"]
    try:
        if meta["format"] == "joblib":
            return joblib.load(path)
        estimator = create_head(meta["head"], **meta["params"])
        if meta["format"] == "ubj":
            import xgboost as xgb

            native = xgb.Booster()
            native.load_model(str(path))
        else:
            import keras

            native = keras.saving.load_model(path, compile=False)
        return estimator.restore(native, meta["fitted_state"])
    except Exception as err:
        raise FeatureStoreError(f"Cannot load {path}: {err}") from err
