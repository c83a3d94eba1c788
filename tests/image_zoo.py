"""Tiny image files for the extract tests: good ones in every format, and a zoo of broken ones."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def gradient_rgb(width: int = 40, height: int = 30, seed: int = 0) -> np.ndarray:
    """A (height, width, 3) uint8 image with structure (so transforms show)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1),
                     (xx + yy) * 127 // max(width + height - 2, 1)], axis=-1)
    noise = rng.integers(0, 30, size=base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def save(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def encoded(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares ``width x height`` but holds no pixel data (a pixel bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def broken_zoo(folder: Path) -> dict[str, Path]:
    """Files that must land in the errors table, keyed by the expected reason's start."""
    folder.mkdir(parents=True, exist_ok=True)
    good = gradient_rgb(64, 48)
    jpeg, png = encoded(good, "JPEG"), encoded(good, "PNG")
    files = {
        "empty file": folder / "zero.jpg",
        "truncated image": folder / "truncated.jpg",
        "truncated png": folder / "truncated.png",
        "not an image": folder / "text.png",
        "too many pixels": folder / "bomb.png",
    }
    files["empty file"].write_bytes(b"")
    files["truncated image"].write_bytes(jpeg[: len(jpeg) // 2])
    files["truncated png"].write_bytes(png[: len(png) // 2])
    files["not an image"].write_text("this is not a picture\n" * 20)
    png_header_only(files["too many pixels"], 11_000, 10_000)
    return files


def image_folder(root: Path, n_per_class: int = 4, classes=("cat_a", "cat_b"),
                 size=(40, 30)) -> list[Path]:
    """``root/<class>/<i>.png`` with distinct images; returns the paths."""
    paths = []
    for c, name in enumerate(classes):
        for i in range(n_per_class):
            fmt = "png" if i % 2 == 0 else "jpg"
            array = gradient_rgb(*size, seed=100 * c + i)
            paths.append(save(root / name / f"{i:03d}.{fmt}", array))
    return paths
