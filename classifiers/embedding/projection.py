"""The projection network: standardise, a few dense layers, L2-normalised output.

Trained with :class:`~classifiers.embedding.losses.MetricLoss` on batches from
:class:`~classifiers.embedding.sampler.PKSampler`. Only built-in Keras layers
(``Normalization`` with numpy statistics, ``Dense``, ``Dropout``,
``UnitNormalization``), so the saved ``.keras`` file loads with
``safe_mode=True`` and runs no code of ours or anyone's.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from classifiers.embedding.losses import LOSSES, MARGINS, MININGS, MetricLoss
from classifiers.embedding.sampler import PKSampler
from classifiers.errors import ClassifierError

INITS = ("pca", "random")
#: Rows the PCA start is computed from (enough for stable leading axes).
PCA_ROWS = 5000


@dataclass(frozen=True)
class ProjectionSpec:
    """Everything that determines a trained projection (with the data); JSON-ready."""

    dim: int = 128
    """Width of the embedding."""
    hidden: tuple[int, ...] = ()
    """Widths of the hidden ReLU layers; ``()`` is a linear projection."""
    init: str = "pca"
    """First layer's start: ``pca`` (the principal axes of the standardised rows, so
    training starts from the parent's own neighbourhoods) or ``random``."""
    loss: str = "triplet"
    """``triplet`` or ``contrastive``."""
    mining: str = "semi-hard"
    """``semi-hard`` or ``hard`` (see :mod:`classifiers.embedding.losses`)."""
    margin: float | None = None
    """Loss margin; ``None``: the loss's default (:data:`MARGINS`)."""
    epochs: int = 20
    p: int = 16
    """Classes per batch."""
    k: int = 4
    """Rows per class per batch."""
    dropout: float = 0.1
    learning_rate: float = 1e-4
    """Adam's rate; low, so the PCA start is refined rather than forgotten (the unseen
    classes of benchmarks/bench_embedding.py lose their neighbourhoods at 1e-3)."""
    seed: int = 0
    extra: dict = field(default_factory=dict)
    """What the caller adds to the record (the rows it was trained on, ...)."""

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if self.loss not in LOSSES:
            raise ClassifierError(f"loss must be one of {', '.join(LOSSES)}; got {self.loss!r}.")
        if self.mining not in MININGS:
            raise ClassifierError(
                f"mining must be one of {', '.join(MININGS)}; got {self.mining!r}.")
        if self.init not in INITS:
            raise ClassifierError(f"init must be one of {', '.join(INITS)}; got {self.init!r}.")
        if self.dim < 1 or self.epochs < 1 or min(self.hidden, default=1) < 1:
            raise ClassifierError(f"dim, epochs and hidden widths must be >= 1; got dim="
                                  f"{self.dim}, epochs={self.epochs}, hidden={self.hidden}.")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        d["margin"] = MARGINS[self.loss] if self.margin is None else float(self.margin)
        return d


def build_projection(X: np.ndarray, spec: ProjectionSpec):
    """A Keras model ``(n, n_features) -> (n, dim)`` standardised by ``X``'s statistics."""
    import keras

    mean, variance = X.mean(0), X.var(0) + 1e-6
    inputs = keras.Input((X.shape[1],), name="features")
    x = keras.layers.Normalization(mean=mean, variance=variance)(inputs)
    widths = [*spec.hidden, spec.dim]
    for i, width in enumerate(widths):
        layer = keras.layers.Dense(width, activation="relu" if i < len(spec.hidden) else None)
        x = layer(x)
        if i == 0 and spec.init == "pca":
            kernel, bias = layer.get_weights()
            axes = pca_axes((X - mean) / np.sqrt(variance), width, spec.seed)
            kernel[:, :axes.shape[1]] = axes
            layer.set_weights([kernel, bias])
        if i < len(spec.hidden):
            x = keras.layers.Dropout(spec.dropout)(x)
    outputs = keras.layers.UnitNormalization(name="embedding")(x)
    return keras.Model(inputs, outputs, name="projection")


def pca_axes(Z: np.ndarray, width: int, seed: int = 0) -> np.ndarray:
    """``(n_features, min(width, rank))`` leading principal axes of standardised rows ``Z``,
    scaled so that projected rows keep the spread of ``Z`` (a rotation, not a whitening)."""
    rows = np.random.default_rng(seed).permutation(len(Z))[:PCA_ROWS]
    _, _, vt = np.linalg.svd(Z[rows] - Z[rows].mean(0), full_matrices=False)
    return vt[:width].T.astype(np.float32)


def fit_projection(X: np.ndarray, labels: np.ndarray, groups: np.ndarray, spec: ProjectionSpec,
                   echo: Callable[[str], None] = print):
    """Train a projection on rows ``X`` ``(n, n_features)`` with their labels and source images.

    Returns ``(model, seconds_per_epoch, losses)``. Seeds Keras from ``spec.seed``
    and leaves Python's and numpy's global random states as they were.
    """
    import keras

    sampler = PKSampler(labels, groups, p=spec.p, k=spec.k, seed=spec.seed)
    codes = np.searchsorted(sampler.classes_, labels).astype("int32")
    saved = random.getstate(), np.random.get_state()
    try:
        keras.utils.set_random_seed(spec.seed)
        model = build_projection(X, spec)
        model.compile(optimizer=keras.optimizers.Adam(spec.learning_rate),
                      loss=MetricLoss(spec.loss, spec.mining, spec.margin))
        seconds, losses = [], []
        for epoch in range(spec.epochs):
            rows = np.concatenate(list(sampler.batches()))
            start = time.perf_counter()
            # Batches are laid end to end: batch_size p*k without shuffling keeps each whole.
            history = model.fit(X[rows], codes[rows], batch_size=sampler.batch_size, epochs=1,
                                shuffle=False, verbose=0)
            seconds.append(time.perf_counter() - start)
            losses.append(float(history.history["loss"][-1]))
            echo(f"epoch {epoch + 1}/{spec.epochs}: loss {losses[-1]:.4f} "
                 f"({seconds[-1]:.2f} s)")
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
    return model, seconds, losses


def project(model, X: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """``(n, n_features)`` -> ``(n, dim)`` float32 embeddings (unit length)."""
    if len(X) == 0:
        return np.empty((0, model.output_shape[-1]), np.float32)
    return np.asarray(model.predict(X, batch_size=batch_size, verbose=0), dtype=np.float32)
