"""The store's images by split, for models trained end to end from pixels.

:func:`load_splits` reads the manifest (train, val, test), refuses a split
layout that cannot train and evaluate before any image is decoded, and
decodes every image once at the model's input size, as uint8 in memory
(a few hundred MB for 20,000 images at 150 px). :func:`train_dataset` and
:func:`eval_dataset` turn them into ``tf.data`` pipelines; augmentation runs
there, with Keras 3 preprocessing layers drawn from the store's presets
(:data:`pipelines.extract.augment.PRESETS`), so the saved model has no
augmentation in it.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from featurestore import FeatureStoreError, Store
from pipelines.extract.augment import AugmentPreset, get_preset
from pipelines.extract.images import ImageDecodeError, load_image

SPLITS = ("train", "val", "test")


@dataclass
class SplitImages:
    """One split's decoded images."""

    pixels: np.ndarray
    """``(n, size, size, 3)`` RGB, uint8 or float32 (see :func:`load_splits`)."""
    labels: np.ndarray
    """``(n,)`` str labels."""
    image_ids: np.ndarray
    """``(n,)`` SHA-256 image ids (the manifest's)."""

    def encoded(self, classes: np.ndarray) -> np.ndarray:
        return np.searchsorted(classes, self.labels)


@dataclass
class ImageSplits:
    classes: np.ndarray
    """Sorted labels of the train split."""
    splits: dict[str, SplitImages]
    digest: str
    """SHA-256 of the (image_id, label, split) rows used: which data the model saw."""
    failed: list[tuple[str, str]]
    """``(path, reason)`` of images that could not be decoded (left out)."""


def manifest_rows(store: Store):
    """The manifest's present images; refuses a store without one."""
    if not store.manifest_path.exists():
        raise FeatureStoreError(f"No manifest in {store.root}: run `featurestore scan DATASET "
                                f"--store {store.root}` first.")
    with store.manifest() as manifest:
        images = manifest.images()
        return images, [manifest.absolute_path(row) for _, row in images.iterrows()]


def check_splits(images) -> np.ndarray:
    """Sorted train labels, after checking that every class can train, stop early and be tested."""
    train = images[images["split"] == "train"]
    classes = np.unique(train["label"].astype(str))
    if len(classes) < 2:
        raise FeatureStoreError(f"The manifest's train split has {len(classes)} label(s) "
                                f"({', '.join(classes) or 'none'}); training needs at least two.")
    for split in ("val", "test"):
        have = set(images.loc[images["split"] == split, "label"].astype(str))
        missing = [c for c in classes if c not in have]
        if missing:
            use = "early stopping and model choice" if split == "val" else "held-out metrics"
            raise FeatureStoreError(
                f"Class(es) {', '.join(missing)} have no {split} images in the manifest, which "
                f"{split} needs for {use}; rescan with a {split} folder or --{split}-fraction.")
        unknown = sorted(have - set(classes))
        if unknown:
            raise FeatureStoreError(f"The {split} split has labels {', '.join(unknown)} that the "
                                    f"train split lacks.")
    return classes


def load_splits(store: Store, size: int, *, interpolation: str = "bilinear",
                dtype=np.uint8, threads: int = 4) -> ImageSplits:
    """Every present image of the manifest, decoded at ``size`` x ``size``, by split.

    ``dtype`` float32 keeps the resized pixels exactly as extraction computes
    them (a fine-tuned model must reproduce its head's features); uint8 takes
    a quarter of the memory for models trained from scratch.
    """
    images, paths = manifest_rows(store)
    classes = check_splits(images)
    failed: list[tuple[str, str]] = []

    def decode(path):
        try:
            pixels = load_image(str(path), (size, size), interpolation=interpolation)
            return pixels if dtype == np.float32 else np.rint(pixels).astype(dtype)
        except ImageDecodeError as err:
            failed.append((str(path), err.reason))
            return None

    with ThreadPoolExecutor(threads) as pool:
        pixels = list(pool.map(decode, paths))
    ok = np.array([p is not None for p in pixels], dtype=bool)
    kept = images[ok].reset_index(drop=True)
    stack = [p for p in pixels if p is not None]
    splits = {}
    for split in SPLITS:
        rows = np.flatnonzero(kept["split"].to_numpy() == split)
        splits[split] = SplitImages(
            np.stack([stack[i] for i in rows]) if len(rows) else
            np.zeros((0, size, size, 3), dtype),
            kept["label"].astype(str).to_numpy()[rows], kept["image_id"].to_numpy()[rows])
    return ImageSplits(classes, splits, rows_digest(kept), failed)


def rows_digest(images) -> str:
    rows = sorted(zip(images["image_id"], images["label"].astype(str), images["split"]))
    return hashlib.sha256("\n".join(map("\t".join, rows)).encode()).hexdigest()


def augmenter(preset: AugmentPreset, seed: int):
    """Keras preprocessing layers drawing random views in the ranges of ``preset``.

    Zoom above 1 zooms in, which Keras spells as a negative factor.
    """
    import keras

    layers = []
    flips = "_and_".join(name for name, on in (("horizontal", preset.horizontal_flip),
                                               ("vertical", preset.vertical_flip)) if on)
    if flips:
        layers.append(keras.layers.RandomFlip(flips, seed=seed))
    if preset.rotation:
        layers.append(keras.layers.RandomRotation(preset.rotation / 360.0, fill_mode="nearest",
                                                  seed=seed + 1))
    if preset.shift or preset.max_shift_y:
        layers.append(keras.layers.RandomTranslation(preset.max_shift_y, preset.shift,
                                                     fill_mode="nearest", seed=seed + 2))
    low, high = preset.zoom
    if (low, high) != (1.0, 1.0):
        layers.append(keras.layers.RandomZoom((1.0 - high, 1.0 - low), fill_mode="nearest",
                                              seed=seed + 3))
    return keras.Sequential(layers) if layers else None


def train_dataset(split: SplitImages, classes, *, batch_size: int, preset: str | None,
                  seed: int):
    """Shuffled, augmented ``tf.data`` batches of ``(float32 0..255 pixels, encoded label)``."""
    import tensorflow as tf

    data = tf.data.Dataset.from_tensor_slices((split.pixels, split.encoded(classes)))
    data = data.shuffle(len(split.labels), seed=seed, reshuffle_each_iteration=True)
    data = data.batch(batch_size).map(lambda x, y: (tf.cast(x, tf.float32), y))
    if preset:
        ranges = get_preset(preset)
        layers = augmenter(ranges, seed)
        rng = tf.random.Generator.from_seed(seed)

        def augment(x, y):
            if layers is not None:
                x = layers(x, training=True)
            if ranges.brightness is not None:  # a factor, as the extract presets apply it
                factor = rng.uniform([tf.shape(x)[0], 1, 1, 1], *ranges.brightness)
                x = tf.clip_by_value(x * factor, 0.0, 255.0)
            return x, y

        data = data.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    return data.prefetch(tf.data.AUTOTUNE)


def eval_dataset(split: SplitImages, classes, *, batch_size: int):
    """Batches of ``(float32 pixels, encoded label)`` in manifest order, not augmented."""
    import tensorflow as tf

    data = tf.data.Dataset.from_tensor_slices((split.pixels, split.encoded(classes)))
    return data.batch(batch_size).map(lambda x, y: (tf.cast(x, tf.float32), y)).prefetch(2)
