"""A table's backbone recipe stacked with a saved Keras head: one model from pixels to classes.

``pixels -> backbone(training=False) -> the table's global pooling -> head``.
The backbone is built exactly as extraction built it (registry entry,
weights file checked against the lineage's SHA-256 or the same seeded random
init, input size); the pixels are decoded and preprocessed as extraction does
(:func:`preprocessed_splits`), so before any training the stacked model must
give the head's saved held-out probabilities (:func:`check_reproduces`).
BatchNormalization must stay in inference mode, or the features the head was
fitted on change under it (the users' collapse to ~0.5 at the first epoch).
The Keras transfer learning guide calls the base with ``training=False``; we
do, but Keras 3.15 does not honour it for a nested model inside a functional
one (``model(x, training=True)`` still trains its BatchNormalization layers,
checked here), so :func:`unfreeze` also keeps every BatchNormalization layer
frozen, which Keras 3 runs in inference mode, and :func:`check_inference_bn`
proves it before any training.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from featurestore import FeatureStoreError, Lineage
from pipelines.backbones.registry import create_backbone, preprocess
from pipelines.cnn.data import ImageSplits, load_splits

#: Largest absolute difference allowed between the stacked model and the head's saved
#: held-out probabilities (float32 through two different graphs).
REPRODUCE_ATOL = 1e-4


def preprocessed_splits(store, recipe) -> ImageSplits:
    """The manifest's splits decoded and preprocessed as extraction does for ``recipe``."""
    splits = load_splits(store, recipe.input_size, interpolation=recipe.interpolation,
                         dtype=np.float32)
    for split in splits.splits.values():
        preprocess(split.pixels, recipe.preprocessing)
    return splits


def stack(recipe, lineage: Lineage, head_model):
    """``(stacked model, backbone)``: ``(batch, s, s, 3)`` preprocessed pixels -> probabilities."""
    import keras

    backbone = create_backbone(recipe.backbone, weights_path=recipe.weights_path,
                               input_size=recipe.input_size, seed=recipe.weights_seed)
    backbone.trainable = False
    pool = {"max": keras.layers.GlobalMaxPooling2D,
            "avg": keras.layers.GlobalAveragePooling2D}[lineage.pool]
    inputs = keras.Input((recipe.input_size, recipe.input_size, 3), name="pixels")
    fmap = backbone(inputs, training=False)  # BatchNormalization stays in inference mode
    outputs = head_model(pool(name=f"{lineage.pool}_pool", dtype="float32")(fmap))
    return keras.Model(inputs, outputs, name=f"{recipe.backbone}_finetune"), backbone


def unfreeze(backbone, block: str | None) -> int:
    """Make the layers whose name starts with ``block`` trainable; returns how many."""
    if not block or block == "none":
        return 0
    chosen = [layer for layer in backbone.layers if layer.name.startswith(block)]
    if not chosen:
        blocks = sorted({layer.name.split("_")[0] for layer in backbone.layers})
        raise FeatureStoreError(f"No layer of {backbone.name} starts with {block!r}; blocks: "
                                f"{', '.join(blocks)}.")
    backbone.trainable = True
    for layer in backbone.layers:
        # A frozen BatchNormalization runs in inference mode (see the module docstring).
        layer.trainable = layer in chosen and not _is_batch_norm(layer)
    return sum(1 for layer in chosen if layer.trainable)


def _is_batch_norm(layer) -> bool:
    import keras

    return isinstance(layer, keras.layers.BatchNormalization)


def check_inference_bn(backbone, pixels: np.ndarray) -> None:
    """Raise unless the backbone gives the same features in training and inference mode.

    ``pixels`` is a small batch ``(n, s, s, 3)``. A BatchNormalization layer in
    training mode normalises with the batch's statistics and so changes them.
    """
    import keras

    def features(training: bool) -> np.ndarray:
        return keras.ops.convert_to_numpy(backbone(pixels, training=training))

    diff = float(np.abs(features(True) - features(False)).max())
    if diff > 1e-5:
        training = [layer.name for layer in backbone.layers
                    if _is_batch_norm(layer) and layer.trainable]
        raise FeatureStoreError(f"BatchNormalization of {backbone.name} runs in training mode "
                                f"(features change by {diff:.2e}; trainable: "
                                f"{', '.join(training) or 'none'}); refusing to fine-tune.")


def check_reproduces(model, pixels: np.ndarray, image_ids, heldout: pd.DataFrame, classes,
                     name: str) -> float:
    """Largest difference to the head's saved held-out probabilities; raises above the limit."""
    from pipelines.cnn.saved import predict_pixels

    columns = [f"proba_{c}" for c in classes]
    saved = heldout.set_index("image_id")
    shared = [i for i, image_id in enumerate(image_ids) if image_id in saved.index]
    if not shared:
        raise FeatureStoreError(f"None of the held-out images of model {name} is in the "
                                f"manifest's splits; cannot check the stacked model.")
    proba = predict_pixels(model, pixels[shared])
    expected = saved.loc[np.asarray(image_ids)[shared], columns].to_numpy()
    diff = np.abs(proba - expected).max(axis=1)
    worst = int(np.argmax(diff))
    if diff[worst] > REPRODUCE_ATOL:
        raise FeatureStoreError(
            f"The stacked backbone + head does not reproduce the saved held-out probabilities "
            f"of {name}: off by {diff[worst]:.2e} (limit {REPRODUCE_ATOL:g}) on image "
            f"{image_ids[shared[worst]][:12]}...; the table's recipe (weights, preprocessing, "
            f"input size, pooling) is not what this machine rebuilds. Nothing was trained.")
    return float(diff[worst])
