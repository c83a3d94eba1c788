"""The ``keras`` runtime: the pooled Keras model, run by the Keras backend (TensorFlow, JAX, ...)."""

from __future__ import annotations

import numpy as np


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

    def predict(pixels: np.ndarray) -> list[np.ndarray]:
        outputs = model.predict_on_batch(pixels)
        return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]

    return predict
