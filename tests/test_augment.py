"""Augmented views: seeded parameters, presets as data, bit-for-bit regeneration."""

import json

import numpy as np
import pytest

from pipelines.extract.augment import PRESETS, apply_augmentation, params_to_json, view_params
from tests.image_zoo import gradient_rgb

IMAGE_ID = "ab" * 32


@pytest.fixture
def image():
    return gradient_rgb(48, 48).astype(np.float32)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_params_depend_only_on_seed_image_and_view(preset):
    forward = [view_params(preset, 7, IMAGE_ID, a) for a in range(1, 6)]
    backward = [view_params(preset, 7, IMAGE_ID, a) for a in reversed(range(1, 6))][::-1]
    assert forward == backward
    assert len({params_to_json(p) for p in forward}) == 5  # views differ
    assert view_params(preset, 8, IMAGE_ID, 1) != forward[0]
    assert view_params(preset, 7, "cd" * 32, 1) != forward[0]


def test_raw_view_has_no_params_and_is_a_copy(image):
    assert view_params("strong", 0, IMAGE_ID, 0) == {}
    out = apply_augmentation(image, {})
    assert np.array_equal(out, image) and out is not image


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_draws_stay_in_preset_ranges(preset):
    ranges = PRESETS[preset]
    draws = [view_params(preset, 0, f"img{i}", 1) for i in range(300)]
    assert max(abs(p["rotation"]) for p in draws) <= ranges.rotation
    assert max(abs(p["shift_x"]) for p in draws) <= ranges.shift
    assert max(abs(p["shift_y"]) for p in draws) <= ranges.max_shift_y
    assert all(ranges.zoom[0] <= p["zoom"] <= ranges.zoom[1] for p in draws)
    assert any(p["flip_h"] for p in draws) == ranges.horizontal_flip
    assert any(p["flip_v"] for p in draws) == ranges.vertical_flip
    assert (len({p["brightness"] for p in draws}) > 1) == (ranges.brightness is not None)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_view_regenerates_bit_for_bit_from_stored_json(image, preset):
    params = view_params(preset, 3, IMAGE_ID, 2)
    first = apply_augmentation(image, params)
    stored = json.loads(params_to_json(params))
    again = apply_augmentation(image.copy(), stored)
    assert first.tobytes() == again.tobytes()
    assert first.dtype == np.float32 and first.shape == image.shape
    assert not np.array_equal(first, image)
    assert first.min() >= 0 and first.max() <= 255


def test_apply_view_does_not_modify_its_input(image):
    before = image.copy()
    apply_augmentation(image, view_params("strong", 0, IMAGE_ID, 1))
    assert np.array_equal(image, before)


def test_identity_transform_is_exact(image):
    params = dict(preset="mild", rotation=0.0, shift_x=0.0, shift_y=0.0, zoom=1.0,
                  flip_h=False, flip_v=False, brightness=1.0)
    assert np.array_equal(apply_augmentation(image, params), image)


def test_flip_and_shift_move_pixels_the_right_way(image):
    base = dict(preset="mild", rotation=0.0, shift_x=0.0, shift_y=0.0, zoom=1.0,
                flip_h=False, flip_v=False, brightness=1.0)
    np.testing.assert_array_equal(apply_augmentation(image, {**base, "flip_h": True}), image[:, ::-1])
    shifted = apply_augmentation(image, {**base, "shift_x": 0.25})  # 12 px to the right
    np.testing.assert_allclose(shifted[:, 12:], image[:, :-12], atol=1e-4)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="Unknown augment preset 'wild'. Available: base, mild, strong"):
        view_params("wild", 0, IMAGE_ID, 1)
