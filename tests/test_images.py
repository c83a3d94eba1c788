"""Image decoding: formats, bit depths, orientation, reduced JPEG decode, and broken files."""

import os
import time

import numpy as np
import pytest
from PIL import Image

from pipelines.extract.images import ImageDecodeError, load_image
from tests.image_zoo import broken_zoo, gradient_rgb, png_header_only, save


@pytest.mark.parametrize("fmt", ["png", "bmp", "tiff", "jpg"])
def test_formats_decode_to_float_rgb(tmp_path, fmt):
    array = gradient_rgb(40, 30)
    path = save(tmp_path / f"img.{fmt}", array, **({"quality": 95} if fmt == "jpg" else {}))
    out = load_image(str(path), (30, 40))
    assert out.shape == (30, 40, 3) and out.dtype == np.float32
    error = np.abs(out - array)
    if fmt == "jpg":
        assert error.mean() < 6
    else:  # lossless formats round-trip exactly
        assert error.max() == 0


def test_resize_to_requested_height_width(tmp_path):
    path = save(tmp_path / "img.png", gradient_rgb(50, 20))
    assert load_image(str(path), (32, 48)).shape == (32, 48, 3)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "1"])
def test_every_mode_becomes_three_channels(tmp_path, mode):
    image = Image.fromarray(gradient_rgb(24, 24)).convert(mode)
    ext = "jpg" if mode == "CMYK" else ("tiff" if mode == "1" else "png")
    path = tmp_path / f"img.{ext}"
    image.save(path)
    out = load_image(str(path), (24, 24))
    assert out.shape == (24, 24, 3)
    if mode in ("L", "LA", "1"):
        assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])


@pytest.mark.parametrize("ext", ["png", "tiff"])
def test_sixteen_bit_scaled_not_clipped(tmp_path, ext):
    wide = np.array([[0, 257, 300, 32768, 65535, 1000]], dtype=np.uint16).repeat(4, axis=0)
    path = tmp_path / f"wide.{ext}"
    Image.fromarray(wide).save(path)
    assert Image.open(path).mode.startswith("I")  # really stored as 16 bit
    out = load_image(str(path), wide.shape)
    expected = wide.astype(np.float64) * 255.0 / 65535.0
    np.testing.assert_allclose(out[..., 0], expected, rtol=1e-6, atol=1e-5)
    assert out[0, 2, 0] != np.round(out[0, 2, 0])  # sub-8-bit precision kept
    assert out.max() == pytest.approx(255.0)


def test_exif_orientation_applied(tmp_path):
    # Stored: left half dark, right half bright. Orientation 6 = rotate 90 deg
    # clockwise to display, so the dark half must end up on top.
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, 20:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    out = load_image(str(path), (40, 20))
    assert out[:15].mean() < 40 and out[25:].mean() > 215


def test_large_jpeg_decoded_at_reduced_size_close_to_full_decode(tmp_path):
    array = np.kron(gradient_rgb(250, 200), np.ones((8, 8, 1), dtype=np.uint8))  # 2000x1600
    path = save(tmp_path / "big.jpg", array, quality=95)
    reduced = load_image(str(path), (224, 224))
    full = np.asarray(Image.open(path).convert("RGB").resize((224, 224), Image.BILINEAR),
                      dtype=np.float32)
    assert reduced.shape == (224, 224, 3)
    assert np.abs(reduced - full).mean() < 3.0
    with Image.open(path) as img:  # the decoder really skips DCT detail
        img.draft("RGB", (224, 224))
        assert img.size == (500, 400)  # 1/4 scale: the smallest that stays >= 224


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("reason", ["empty file", "truncated image", "truncated png",
                                    "not an image", "too many pixels"])
def test_broken_files_raise_with_reason(tmp_path, reason):
    path = broken_zoo(tmp_path)[reason]
    with pytest.raises(ImageDecodeError) as info:
        load_image(str(path), (32, 32))
    expected = "truncated image" if reason == "truncated png" else reason
    assert info.value.reason.startswith(expected)
    assert info.value.path == str(path)


def test_pixel_bomb_refused_from_header_quickly(tmp_path):
    path = png_header_only(tmp_path / "huge.png", 20_000, 20_000)  # 400 MP declared
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="too many pixels"):
        load_image(str(path), (32, 32))
    assert time.perf_counter() - start < 0.5


def test_max_pixels_is_per_call(tmp_path):
    path = save(tmp_path / "img.png", gradient_rgb(40, 30))
    with pytest.raises(ImageDecodeError, match="too many pixels: 40x30"):
        load_image(str(path), (32, 32), max_pixels=1000)
    assert load_image(str(path), (32, 32), max_pixels=1200).shape == (32, 32, 3)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageDecodeError, match="file not found"):
        load_image(str(tmp_path / "nope.png"), (32, 32))
    with pytest.raises(ImageDecodeError, match="not a regular file"):
        load_image(str(tmp_path), (32, 32))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path):
    path = save(tmp_path / "img.png", gradient_rgb())
    path.chmod(0)
    with pytest.raises(ImageDecodeError, match="permission denied"):
        load_image(str(path), (32, 32))


def test_unknown_interpolation_names_the_choices(tmp_path):
    path = save(tmp_path / "img.png", gradient_rgb())
    with pytest.raises(ValueError, match="interpolation must be one of nearest, bilinear"):
        load_image(str(path), (32, 32), interpolation="area")
