"""The ``keras`` runtime: the pooled Keras model, run by the Keras backend (TensorFlow, JAX, ...)."""

from __future__ import annotations

import numpy as np


#: Whether it runs one inference stream per core itself (then one process is enough).
STREAMS = False

def unavailable() -> str | None:
    return None


def refuses(backbone: str, precision: str) -> str | None:
    return None


def pooled_keras_model(settings):
    """The pooled Keras model of ``settings`` (an ``EngineSettings``): weights loaded."""
    from pipelines.backbones.registry import create_backbone, pooled_model
    from pipelines.extract.engine import PRECISIONS

    backbone = create_backbone(
        settings.backbone, weights_path=settings.weights_path, input_size=settings.input_size,
        seed=settings.seed, dtype_policy=PRECISIONS[settings.precision])
    return pooled_model(backbone, settings.pools)


def build(settings):
    model = pooled_keras_model(settings)

    def predict(pixels: np.ndarray, n: int) -> list[np.ndarray]:
        # The whole padded batch: one shape, one compiled graph (see pipelines.extract.loader).
        outputs = model.predict_on_batch(pixels)
        outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        return [np.asarray(out)[:n] for out in outputs]

    return predict
