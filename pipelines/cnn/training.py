"""Training with checkpoints: early stopping on val, best val_loss kept, resumable after a kill.

The work folder (``STORE/training/<key>/<head>/``, :meth:`StorePaths.training_of`)
holds ``best.keras`` (Keras' ``ModelCheckpoint``, best val_loss so far),
``history.csv`` (Keras' ``CSVLogger``, one row per finished epoch) and
``recipe.json`` (what is being trained). ``resume=True`` loads ``best.keras``
with ``safe_mode`` and goes on from the epoch after the last logged one; a
different recipe is refused rather than mixed in.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from featurestore import FeatureStoreError
from featurestore._io import atomic_write_text

BEST_FILE = "best.keras"
HISTORY_FILE = "history.csv"
RECIPE_FILE = "recipe.json"
#: Parameters a resumed run may change: they say how long to go on, not what is trained.
RESUMABLE_CHANGES = ("epochs", "patience")


@dataclass
class TrainingRun:
    model: object
    """The Keras model with the weights of the best val_loss epoch."""
    epochs: int
    """Epochs logged in total (earlier runs of a resumed training included)."""
    epoch_seconds: list[float] = field(default_factory=list)
    """Wall seconds of each epoch run in this call."""
    history: pd.DataFrame | None = None

    @property
    def seconds_per_epoch(self) -> float | None:
        return sum(self.epoch_seconds) / len(self.epoch_seconds) if self.epoch_seconds else None


def train(model, train_data, val_data, *, work_dir: Path, recipe: dict, epochs: int,
          patience: int = 5, resume: bool = False, class_weight: dict | None = None,
          echo: Callable[[str], None] = print) -> TrainingRun:
    """Fit ``model`` (compiled) for up to ``epochs``; return the best val_loss checkpoint."""
    import keras

    work_dir.mkdir(parents=True, exist_ok=True)
    initial_epoch, best_loss = 0, None
    if resume:
        model, initial_epoch, best_loss = _resumed(work_dir, recipe, echo) or (model, 0, None)
    else:
        for name in (BEST_FILE, HISTORY_FILE):  # our own files: a fresh start replaces them
            (work_dir / name).unlink(missing_ok=True)
    atomic_write_text(work_dir / RECIPE_FILE, json.dumps(recipe, sort_keys=True, indent=1))
    clock = _epoch_clock(echo, epochs)
    stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience,
                                            restore_best_weights=True)
    callbacks = [
        stopper,
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5,
                                          patience=max(1, patience // 2)),
        keras.callbacks.ModelCheckpoint(str(work_dir / BEST_FILE), monitor="val_loss",
                                        save_best_only=True, initial_value_threshold=best_loss),
        keras.callbacks.CSVLogger(str(work_dir / HISTORY_FILE), append=resume),
        clock,
    ]
    ran = initial_epoch < epochs
    if ran:
        model.fit(train_data, validation_data=val_data, epochs=epochs,
                  initial_epoch=initial_epoch, callbacks=callbacks, class_weight=class_weight,
                  shuffle=False,  # the tf.data pipeline shuffles
                  verbose=0)
    else:
        echo(f"All {epochs} epochs are done already; evaluating the best checkpoint.")
    if not ran or (best_loss is not None and best_loss <= stopper.best):
        # The best epoch is an earlier run's: only its checkpoint has it. Otherwise the
        # stopper put this run's best weights back, the same as the checkpoint's.
        model = keras.saving.load_model(work_dir / BEST_FILE, safe_mode=True)
    history = pd.read_csv(work_dir / HISTORY_FILE)
    return TrainingRun(model, len(history), clock.seconds, history)


def _resumed(work_dir: Path, recipe: dict, echo):
    """``(model, next epoch, best val_loss)`` from the checkpoint, or None to start afresh."""
    import keras

    best, history = work_dir / BEST_FILE, work_dir / HISTORY_FILE
    if not best.exists() or not history.exists():
        echo(f"Nothing to resume in {work_dir}; starting from epoch 1.")
        return None
    saved = json.loads((work_dir / RECIPE_FILE).read_text()) \
        if (work_dir / RECIPE_FILE).exists() else None
    if saved is None or _comparable(saved) != _comparable(json.loads(json.dumps(recipe))):
        raise FeatureStoreError(f"The checkpoint in {work_dir} is of another recipe (data, "
                                f"architecture or parameters changed); rerun without --resume "
                                f"to start afresh.")
    try:
        log = pd.read_csv(history)
        model = keras.saving.load_model(best, safe_mode=True)
    except Exception as err:  # Keras raises many types for a cut-off zip
        # ModelCheckpoint writes in place, so a kill while it saves leaves half a file.
        raise FeatureStoreError(f"The checkpoint in {work_dir} cannot be read ({type(err).__name__}"
                                f"), likely cut off by a kill while it was written; rerun "
                                f"without --resume to start afresh.") from err
    echo(f"Resuming after epoch {len(log)} from {best} (best val_loss "
         f"{log['val_loss'].min():.4f}).")
    return model, len(log), float(log["val_loss"].min())


def _comparable(recipe: dict) -> dict:
    """The recipe without how long to train: a resume may ask for more epochs."""
    params = {k: v for k, v in recipe.get("params", {}).items() if k not in RESUMABLE_CHANGES}
    return {**recipe, "params": params}


def _epoch_clock(echo, epochs):
    """A Keras callback printing one line per epoch and keeping each epoch's wall time."""
    import keras

    class EpochClock(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self._started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._started)
            shown = ", ".join(f"{k} {v:.4f}" for k, v in (logs or {}).items()
                              if k in ("loss", "accuracy", "val_loss", "val_accuracy"))
            echo(f"epoch {epoch + 1}/{epochs}: {shown} ({self.seconds[-1]:.1f} s)")

    return EpochClock()
