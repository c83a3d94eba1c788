"""The project's demo dataset: scikit-learn's handwritten digits as an image folder.

``sklearn.datasets.load_digits`` ships 1,797 real 8x8 grayscale scans inside the
scikit-learn wheel, so examples and tests get real images without a download.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits_dataset(dest: str | os.PathLike, *, size: int = 32) -> Path:
    """Write the digits as ``dest/<digit>/<index:04d>.png`` and return ``dest``.

    Pixel values 0..16 are scaled to 0..255 (uint8, mode ``L``) and the 8x8
    images upscaled to ``size`` x ``size`` with bicubic interpolation. Files that
    already hold the same bytes are left untouched (so their mtime, and a
    manifest's "unchanged" check, survive a second call).
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive int (pixels per side); got {size!r}.")
    from sklearn.datasets import load_digits  # heavy import, only needed here

    digits = load_digits()
    dest = Path(dest)
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    for index, (image, digit) in enumerate(zip(pixels, digits.target)):
        path = dest / str(digit) / f"{index:04d}.png"
        _write_if_changed(path, _png_bytes(image, size))
    return dest


def write_new_scans(dest: str | os.PathLike, *, size: int = 32, count: int = 24) -> list[Path]:
    """Write ``count`` digits, 10% dimmer, as ``dest/new-<index>-digit<d>.png``: scans the
    store has never seen (new bytes), for ``featurestore predict``. Returns their paths."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    step = max(1, len(pixels) // count)
    paths = []
    for index in range(0, step * count, step):
        path = Path(dest) / f"new-{index:04d}-digit{digits.target[index]}.png"
        dimmer = np.rint(pixels[index] * 0.9).astype(np.uint8)
        _write_if_changed(path, _png_bytes(dimmer, size))
        paths.append(path)
    return paths


def _png_bytes(image: np.ndarray, size: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_if_changed(path: Path, data: bytes) -> None:
    try:
        if path.read_bytes() == data:
            return
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so an interrupted run never leaves a truncated PNG behind.
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    except OSError as err:
        raise OSError(f"Cannot write demo image {path}: {err.strerror}") from err
