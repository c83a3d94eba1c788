"""``featurestore predict`` for end-to-end models: pixels straight through the saved network.

The files are found, hashed and reported as for a head (the same output
columns, ``source`` ``pixels``); each image is decoded at the model's input
size (with its table's interpolation and preprocessing for a fine-tuned
model) and scored by ``model.keras``, then decided with the saved threshold.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featurestore import FeatureStoreError, Store
from pipelines.extract.images import ImageDecodeError, load_image
from pipelines.heads.model_folder import read_record
from pipelines.heads.models import ModelRef, decide_labels


@dataclass
class EndToEndModel:
    """What ``predict``'s output table needs of a model (classes, decision rule)."""

    keras_model: object
    classes: np.ndarray
    threshold: float | None
    positive_class: str | None
    size: int
    recipe: object = None
    """The table's recipe of a fine-tuned model (preprocessing), else None (0..255 input)."""

    def decide(self, proba: np.ndarray) -> np.ndarray:
        return decide_labels(self, proba)

    def score(self, path: Path) -> np.ndarray:
        from pipelines.backbones.registry import preprocess

        interpolation = self.recipe.interpolation if self.recipe else "bilinear"
        pixels = load_image(str(path), (self.size, self.size), interpolation=interpolation)
        if self.recipe is not None:
            pixels = preprocess(pixels, self.recipe.preprocessing)
        return np.asarray(self.keras_model.predict(pixels[None], verbose=0)[0], np.float64)


def is_end_to_end(ref: ModelRef) -> bool:
    from pipelines.cnn.saved import END_TO_END

    return read_record(ref.path).get("kind") == END_TO_END


def load_end_to_end_model(ref: ModelRef, weights: str | None = None) -> EndToEndModel:
    from pipelines.cnn.saved import load_end_to_end
    from pipelines.heads.models import record_lineage

    meta = read_record(ref.path)
    recipe, size = None, meta["recipe"]["params"].get("image_size")
    if meta.get("lineage"):
        from pipelines.finetune.run import _recipe_of

        recipe = _recipe_of(record_lineage(ref.path, meta), weights)
        size = recipe.input_size
    return EndToEndModel(load_end_to_end(ref.path, meta), np.asarray(meta["classes"]),
                         meta.get("threshold"), meta.get("positive_class"), size, recipe)


def run_predict_end_to_end(store: Store, ref: ModelRef, config, echo, started: float):
    """:func:`pipelines.heads.predict.run_predict` for a ``train-cnn`` or ``fine-tune`` model."""
    from pipelines.heads import predict as head_predict

    model = load_end_to_end_model(ref, config.weights)
    files, skipped = head_predict.collect_images(config.inputs)
    if not files:
        raise FeatureStoreError(f"No image files in {', '.join(map(str, config.inputs))}.")
    image_ids, errors = head_predict._hash_files(files)
    scores = {}
    for path, image_id in zip(files, image_ids):
        if image_id and image_id not in scores and image_id not in errors:
            try:
                scores[image_id] = (model.score(path), "pixels")
            except ImageDecodeError as err:
                errors[image_id] = err.reason
    echo(f"Model {ref.name} (end to end): {len(files)} file(s), {len(scores)} scored.")
    frame = head_predict._frame(files, image_ids, errors, scores, model)
    head_predict.write_predictions(frame, config.out)
    return head_predict.PredictResult(frame, Path(config.out), ref.name,
                                      [str(c) for c in model.classes], skipped,
                                      time.perf_counter() - started)
