"""Decode one image file into a fixed-size float RGB array, or say why not.

``load_image(path, size)`` returns ``(height, width, 3)`` float32 in 0..255:

* JPEG, PNG (8 and 16 bit), BMP, TIFF and anything else Pillow reads; the first
  frame of multi-frame files.
* Grayscale, palette, CMYK, alpha and 1-bit images become 3-channel RGB (alpha
  is dropped). 16-bit samples are scaled by 255/65535 in float, so the 16-bit
  precision survives the resize instead of being clipped or truncated to 8 bit.
* The EXIF orientation tag is applied.
* Large JPEGs are decoded at a reduced DCT scale (``Image.draft``) that is
  still at least the target size, then resized: several times faster than a
  full decode for multi-megapixel scans.
* Pixel bombs are refused from the header alone, before any pixel is decoded.

Every failure raises ``ImageDecodeError`` with a short ``reason`` ("empty
file", "truncated image", "not an image", ...) that the extract stage stores in
its errors table; the run goes on.

``read_image_file(path)`` and ``decode_image(data, size)`` are the two halves
of ``load_image``: a caller that must know which bytes were decoded (the image
id is their SHA-256) reads once, hashes, and decodes the same bytes.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: Images with more pixels than this are refused (per file) before decoding.
DEFAULT_MAX_PIXELS = 100_000_000

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_EIGHT_BIT_GRAY = ("1", "L", "LA", "La")
# EXIF orientations 5..8 transpose the image, so draft must ask for (h, w).
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


class ImageDecodeError(Exception):
    """One file cannot be turned into an image; ``reason`` says why, briefly."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def load_image(
    path: str,
    size: tuple[int, int],
    *,
    interpolation: str = "bilinear",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode ``path`` and resize it to ``size = (height, width)``.

    Returns float32 ``(height, width, 3)`` RGB in 0..255. The aspect ratio is
    not kept, as in ``keras.utils.load_img(target_size=...)``.
    """
    _check_interpolation(interpolation)
    return decode_image(read_image_file(path), size, path=path, interpolation=interpolation,
                        max_pixels=max_pixels)


def read_image_file(path: str) -> bytes:
    """The bytes of ``path``; ``ImageDecodeError`` for missing, unreadable or empty files."""
    _check_file(path)
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError as err:
        raise ImageDecodeError(path, "file not found") from err
    except PermissionError as err:
        raise ImageDecodeError(path, "permission denied") from err
    except OSError as err:  # EIO, EISDIR, ...: this file fails, the run goes on
        raise ImageDecodeError(path, f"cannot read: {err.strerror or err}") from err
    if not data:
        raise ImageDecodeError(path, "empty file")
    return data


def decode_image(
    data: bytes,
    size: tuple[int, int],
    *,
    path: str = "<bytes>",
    interpolation: str = "bilinear",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode the encoded image ``data`` as :func:`load_image` does; ``path`` names it in errors."""
    _check_interpolation(interpolation)
    try:
        with Image.open(io.BytesIO(data)) as img:
            _check_pixels(path, img, max_pixels)
            _draft(img, size)
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb_array(img, size, _RESAMPLE[interpolation])
    except ImageDecodeError:
        raise
    except Exception as err:  # Pillow raises many types; each file fails alone
        raise ImageDecodeError(path, _reason(err)) from err


def _check_interpolation(interpolation: str) -> None:
    if interpolation not in _RESAMPLE:
        raise ValueError(
            f"interpolation must be one of {', '.join(_RESAMPLE)}; got {interpolation!r}."
        )


def _check_file(path: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError as err:
        raise ImageDecodeError(path, "file not found") from err
    except PermissionError as err:
        raise ImageDecodeError(path, "permission denied") from err
    if not os.path.isfile(path):
        raise ImageDecodeError(path, "not a regular file")
    if st.st_size == 0:
        raise ImageDecodeError(path, "empty file")


def _check_pixels(path: str, img: Image.Image, max_pixels: int) -> None:
    width, height = img.size
    if width * height > max_pixels:
        raise ImageDecodeError(
            path, f"too many pixels: {width}x{height} = {width * height:,} > {max_pixels:,}"
        )


def _draft(img: Image.Image, size: tuple[int, int]) -> None:
    """Ask the JPEG decoder for a 1/2, 1/4 or 1/8 scale no smaller than ``size``."""
    if img.format != "JPEG":
        return
    height, width = size
    orientation = img.getexif().get(0x0112, 1)
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    img.draft(img.mode, (width, height))


def _to_rgb_array(img: Image.Image, size: tuple[int, int], resample) -> np.ndarray:
    """``(h, w, 3)`` float32 0..255; gray images are resized once, then stacked."""
    height, width = size
    if img.mode in _SIXTEEN_BIT:
        # Resize in float ("F") so 16-bit precision is kept, then scale to 0..255.
        wide = Image.fromarray(np.asarray(img, dtype=np.float32))
        gray = np.asarray(wide.resize((width, height), resample), dtype=np.float32)
        gray = np.clip(gray, 0.0, 65535.0) * np.float32(255.0 / 65535.0)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode == "F":
        raise ValueError("unsupported pixel mode 'F' (floating-point samples)")
    if img.mode in _EIGHT_BIT_GRAY:
        gray = img.convert("L").resize((width, height), resample)
        return np.repeat(np.asarray(gray, dtype=np.float32)[:, :, None], 3, axis=2)
    rgb = img.convert("RGB").resize((width, height), resample)
    return np.asarray(rgb, dtype=np.float32)


def _reason(err: Exception) -> str:
    """A short, stable reason for the errors table."""
    text = str(err)
    if isinstance(err, PermissionError):
        return "permission denied"
    if isinstance(err, Image.DecompressionBombError):
        return f"too many pixels: {text}"
    if isinstance(err, UnidentifiedImageError):
        return "not an image"
    if "truncated" in text.lower() or isinstance(err, EOFError):
        return "truncated image"
    return f"corrupt image: {type(err).__name__}: {text}"
