"""``keras_dense``: a small dense network on the features, early-stopped on a grouped hold-out.

Input standardisation is a ``Normalization`` layer inside the model (mean and
variance computed with numpy, not ``adapt``), so the saved ``.keras`` file is
the whole predictor. Keras is imported only when a model is built, so listing
the registry stays cheap.

Seeding: ``fit`` seeds Keras (weights, dropout, shuffling) from
``random_state`` and then restores Python's and numpy's global random states,
so calling it has no side effect on the caller's random numbers. The search
clears the Keras session after every fold (:meth:`KerasDenseHead.clear_backend`,
i.e. :func:`clear_keras_session`), so memory does not grow from trial to trial.
"""

from __future__ import annotations

import gc
import random
from pathlib import Path

import numpy as np

from classifiers.heads.base import PREDICT_BATCH, HeadBase, expect_file, inner_split
from classifiers.registry import register_head

KERAS_FILE = "model.keras"


def search_space(trial) -> dict:
    """Depth, width, dropout, L1/L2, Adam learning rate and batch size."""
    return {
        "n_layers": trial.suggest_int("n_layers", 1, 3),
        "units": trial.suggest_categorical("units", [64, 128, 256, 512]),
        "dropout": trial.suggest_float("dropout", 0.0, 0.6),
        "l1": trial.suggest_float("l1", 1e-8, 1e-3, log=True),
        "l2": trial.suggest_float("l2", 1e-8, 1e-2, log=True),
        "learning_rate": trial.suggest_float("learning_rate", 3e-4, 1e-2, log=True),
        # Large batches: an epoch of 16,640 rows costs ~55 steps at 256 instead
        # of ~260 at 64, and Adam at these rates converges in a few epochs.
        "batch_size": trial.suggest_categorical("batch_size", [256, 512, 1024]),
    }


@register_head(
    "keras_dense", search_space=search_space, uses_keras=True,
    test_params={"max_epochs": 5, "units": 16, "batch_size": 16, "learning_rate": 0.05},
    expected_failed_checks={
        "check_sample_weight_equivalence_on_dense_data":
            "mini-batch SGD: repeating a row and doubling its weight change the batches, "
            "so the fits agree only approximately",
    })
class KerasDenseHead(HeadBase):
    """Dense network (Keras): Normalization -> [Dense, Dropout] x n_layers -> softmax.

    Parameters
    ----------
    n_layers, units : int
        Hidden layers and units per layer.
    dropout : float
        Dropout rate after each hidden layer.
    l1, l2 : float
        Kernel regularisation of the hidden layers.
    learning_rate : float
        Adam learning rate.
    batch_size : int
        Mini-batch size.
    steps_per_execution : int
        Training steps per call into TensorFlow: the same updates, fewer Python
        round trips (16 made an epoch of 14,000 x 1,024 ~25 % faster here; XLA's
        ``jit_compile`` made it 4-10x slower on CPU, so it stays off).
    max_epochs, patience : int
        Epoch limit, and epochs without hold-out improvement before stopping
        (the best weights are restored).
    validation_fraction : float
        Share of training rows (whole groups) held out for early stopping.
    class_weight : None, "balanced" or dict
        See :mod:`classifiers.heads.base`.
    random_state : int
        Seed of weights, dropout, shuffling and the hold-out split.
    verbose : int
        Keras ``fit`` verbosity.
    """

    def __init__(self, n_layers=1, units=256, dropout=0.2, l1=0.0, l2=1e-4,
                 learning_rate=1e-3, batch_size=256, steps_per_execution=16, max_epochs=40,
                 patience=4, validation_fraction=0.15, class_weight=None, random_state=0,
                 verbose=0):
        self.n_layers = n_layers
        self.units = units
        self.dropout = dropout
        self.l1 = l1
        self.l2 = l2
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.steps_per_execution = steps_per_execution
        self.max_epochs = max_epochs
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.class_weight = class_weight
        self.random_state = random_state
        self.verbose = verbose

    def _build(self, X: np.ndarray, n_classes: int):
        import keras

        mean = X.mean(axis=0, dtype=np.float64)
        var = np.maximum(X.var(axis=0, dtype=np.float64), 1e-12)
        layers = [keras.Input(shape=(X.shape[1],)),
                  keras.layers.Normalization(mean=mean, variance=var)]
        for i in range(self.n_layers):
            layers.append(keras.layers.Dense(
                self.units, activation="relu",
                kernel_regularizer=keras.regularizers.L1L2(l1=self.l1, l2=self.l2),
                kernel_initializer=keras.initializers.HeUniform(seed=self.random_state + i)))
            if self.dropout > 0:
                layers.append(keras.layers.Dropout(self.dropout, seed=self.random_state + i))
        layers.append(keras.layers.Dense(
            n_classes, activation="softmax",
            kernel_initializer=keras.initializers.GlorotUniform(seed=self.random_state)))
        model = keras.Sequential(layers)
        model.compile(optimizer=keras.optimizers.Adam(self.learning_rate),
                      loss="sparse_categorical_crossentropy", jit_compile=False,
                      steps_per_execution=self.steps_per_execution)
        return model

    def fit(self, X, y, groups=None, sample_weight=None):
        """Fit on ``X (n_samples, n_features)``; ``groups`` keep the hold-out grouped."""
        import keras

        X, y_enc, weight = self._prepare_fit(X, y, sample_weight)
        split = inner_split(y_enc, groups, self.validation_fraction, self.random_state)
        state = random.getstate(), np.random.get_state()
        try:
            keras.utils.set_random_seed(self.random_state)
            model = self._build(X, len(self.classes_))
            callbacks = [keras.callbacks.TerminateOnNaN()]
            kwargs = {}
            if split is not None:
                tr, va = split
                kwargs["validation_data"] = (X[va], y_enc[va], weight[va])
                X, y_enc, weight = X[tr], y_enc[tr], weight[tr]
                callbacks.append(keras.callbacks.EarlyStopping(
                    patience=self.patience, restore_best_weights=True))
            history = model.fit(X, y_enc, sample_weight=weight, batch_size=self.batch_size,
                                epochs=self.max_epochs, callbacks=callbacks,
                                verbose=self.verbose, **kwargs)
        finally:
            random.setstate(state[0])
            np.random.set_state(state[1])
        losses = history.history.get("loss", [])
        if not losses or not np.all(np.isfinite(losses)):
            raise FloatingPointError(
                f"keras_dense diverged: training loss became {losses[-1] if losses else None} "
                f"(learning_rate={self.learning_rate}).")
        self.model_ = model
        self.n_epochs_ = len(losses)
        return self

    def _proba(self, X):
        import keras

        out = [keras.ops.convert_to_numpy(self.model_(X[i: i + PREDICT_BATCH], training=False))
               for i in range(0, len(X), PREDICT_BATCH)]
        return np.concatenate(out) if out else np.empty((0, len(self.classes_)))

    def save(self, folder: Path) -> list[str]:
        """The whole predictor (normalisation included) as a Keras ``model.keras`` file."""
        self.model_.save(str(folder / KERAS_FILE))
        return [KERAS_FILE]

    @classmethod
    def load(cls, folder: Path, files: list[str], state, params) -> KerasDenseHead:
        import keras

        head = cls(**params)
        head._restore_state(state)
        # safe_mode refuses Lambda layers, the one way a .keras file could carry code.
        head.model_ = keras.saving.load_model(folder / expect_file(cls, files, KERAS_FILE),
                                              compile=False, safe_mode=True)
        return head

    @classmethod
    def clear_backend(cls) -> None:
        clear_keras_session()


def clear_keras_session() -> None:
    """Free the models Keras keeps after they are dropped: the one place this is done.

    ``clear_session`` then ``gc.collect``: TensorFlow frees a model's graph only
    once Python has dropped the last reference to it.
    """
    import keras

    keras.backend.clear_session()
    gc.collect()
