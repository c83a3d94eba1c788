"""Seeded augmented views: presets as data, parameters from (seed, image, view).

A view is identified by ``(image_id, aug_id)``; ``aug_id = 0`` is the raw image
and ``1..N`` are augmented views. ``view_params`` draws a view's parameters from
``(seed, image_id, aug_id)`` alone, so they do not depend on the order, batch,
worker or shard an image is processed in; the parameters are stored as JSON
next to the features, and ``apply_augmentation(image, params)`` regenerates that view
bit for bit from them.

Transforms follow ``ImageDataGenerator.random_transform`` (the users' previous
pipeline): flips, then one affine map (rotation about the centre, shift, zoom)
with bilinear interpolation and nearest-edge fill, applied to the image already
resized to the backbone's input size, then a brightness factor. Zoom is
isotropic (one factor for both axes) so an X-ray's aspect stays true.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class AugmentPreset:
    """Ranges a view's parameters are drawn from (uniformly)."""

    rotation: float
    """Maximum absolute rotation in degrees."""
    shift: float
    """Maximum absolute shift, as a fraction of width (x), and of height (y) unless ``shift_y``."""
    zoom: tuple[float, float]
    """Zoom factor range; above 1 zooms in."""
    horizontal_flip: bool
    """Flip left-right with probability 1/2."""
    vertical_flip: bool
    """Flip top-bottom with probability 1/2."""
    brightness: tuple[float, float] | None
    """Brightness factor range, or None for no brightness change."""
    shift_y: float | None = None
    """Maximum absolute vertical shift as a fraction of height; None: the same as ``shift``."""

    @property
    def max_shift_y(self) -> float:
        return self.shift if self.shift_y is None else self.shift_y


PRESETS: dict[str, AugmentPreset] = {
    # The users' own base from their ImageDataGenerator runs: scans keep their
    # orientation and scale, so only shifts, a left-right flip and a faint brightness change.
    "base": AugmentPreset(
        rotation=0.0, shift=0.1, shift_y=0.05, zoom=(1.0, 1.0),
        horizontal_flip=True, vertical_flip=False, brightness=(0.95, 1.05),
    ),
    "mild": AugmentPreset(
        rotation=10.0, shift=0.05, zoom=(0.95, 1.05),
        horizontal_flip=True, vertical_flip=False, brightness=None,
    ),
    "strong": AugmentPreset(
        rotation=25.0, shift=0.15, zoom=(0.85, 1.15),
        horizontal_flip=True, vertical_flip=True, brightness=(0.7, 1.3),
    ),
}

#: ``aug_params`` of the raw (unaugmented) view.
RAW_PARAMS: dict = {}


def get_preset(name: str) -> AugmentPreset:
    """The preset called ``name``; unknown names list the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"Unknown augment preset {name!r}. Available: {', '.join(sorted(PRESETS))}."
        ) from None


def view_params(preset: str, seed: int, image_id: str, aug_id: int) -> dict:
    """Parameters of view ``aug_id`` of ``image_id``; ``{}`` for ``aug_id == 0``.

    Deterministic in ``(preset, seed, image_id, aug_id)`` only. The result is
    JSON-safe; floats round-trip exactly through ``json.dumps``/``loads``.
    """
    if aug_id < 0:
        raise ValueError(f"aug_id must be >= 0; got {aug_id}.")
    if aug_id == 0:
        return dict(RAW_PARAMS)
    ranges = get_preset(preset)
    rng = np.random.default_rng([int(seed), *_image_words(image_id), int(aug_id)])
    # Draw every field even when unused, so adding a field to one preset does
    # not shift the values drawn for the others.
    draws = rng.uniform(size=7)
    return {
        "preset": preset,
        "rotation": float((2 * draws[0] - 1) * ranges.rotation),
        "shift_x": float((2 * draws[1] - 1) * ranges.shift),
        "shift_y": float((2 * draws[2] - 1) * ranges.max_shift_y),
        "zoom": float(ranges.zoom[0] + draws[3] * (ranges.zoom[1] - ranges.zoom[0])),
        "flip_h": bool(ranges.horizontal_flip and draws[4] < 0.5),
        "flip_v": bool(ranges.vertical_flip and draws[5] < 0.5),
        "brightness": (
            1.0 if ranges.brightness is None
            else float(ranges.brightness[0] + draws[6] * (ranges.brightness[1] - ranges.brightness[0]))
        ),
    }


def _image_words(image_id: str) -> tuple[int, int]:
    """Two 32-bit words from a hash of ``image_id`` (any string) for seeding."""
    digest = hashlib.sha256(str(image_id).encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")


def params_to_json(params: dict) -> str:
    """Canonical JSON (sorted keys) of a view's parameters."""
    return json.dumps(params, sort_keys=True)


def apply_augmentation(image: np.ndarray, params: dict) -> np.ndarray:
    """Return view ``params`` of ``image``, a ``(h, w, 3)`` float32 0..255 array.

    Pure: the input is not modified, and the same ``params`` give an identical
    array. ``params == {}`` (the raw view) returns a copy of ``image``.
    """
    out = np.array(image, dtype=np.float32, copy=True)
    if not params:
        return out
    if params["flip_h"]:
        out = out[:, ::-1]
    if params["flip_v"]:
        out = out[::-1]
    out = _affine(out, params["rotation"], params["shift_x"], params["shift_y"], params["zoom"])
    if params["brightness"] != 1.0:
        out *= np.float32(params["brightness"])
        np.clip(out, 0.0, 255.0, out=out)
    return out


def _affine(image, rotation_deg, shift_x, shift_y, zoom) -> np.ndarray:
    """Rotate about the centre, zoom and shift; bilinear, nearest-edge fill."""
    from scipy import ndimage

    h, w = image.shape[:2]
    theta = math.radians(rotation_deg)
    cos, sin = math.cos(theta) / zoom, math.sin(theta) / zoom
    # Output pixel (r, c) samples input at M @ (r, c) + offset: the inverse of
    # "zoom by z, rotate by theta about the centre, then shift".
    matrix = np.array([[cos, sin, 0.0], [-sin, cos, 0.0], [0.0, 0.0, 1.0]])
    center = np.array([(h - 1) / 2.0, (w - 1) / 2.0, 0.0])
    shift = np.array([shift_y * h, shift_x * w, 0.0])
    offset = center - matrix @ (center + shift)
    return ndimage.affine_transform(
        np.ascontiguousarray(image), matrix, offset=offset, order=1, mode="nearest"
    ).astype(np.float32, copy=False)
