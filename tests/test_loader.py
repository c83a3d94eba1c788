"""Batch loader: order, fixed shapes with padding, per-file errors, bounded prefetch."""

import dataclasses
import threading

import numpy as np
import pytest

from featurestore.scan import hash_file
from pipelines.extract import loader
from pipelines.extract.augment import apply_augmentation, view_params
from pipelines.backbones.registry import preprocess
from pipelines.extract.images import load_image
from pipelines.extract.loader import ImageTask, ViewRecipe, decode_views, iter_batches
from tests.image_zoo import broken_zoo, image_folder


def tasks_for(paths, aug_ids=(0,)):
    return [ImageTask(image_id=_image_id(p), path=p.name, file=str(p), label="a",
                      split="train", aug_ids=tuple(aug_ids)) for p in paths]


def _image_id(path):
    try:
        return hash_file(path)
    except OSError:  # the broken zoo's missing files: the loader reports them
        return "0" * 64


@pytest.fixture
def paths(tmp_path):
    return image_folder(tmp_path / "data", n_per_class=4)


def test_batches_keep_order_and_pad_the_last_one(paths):
    recipe = ViewRecipe(size=32, preprocessing="torch")
    batches = list(iter_batches(tasks_for(paths), recipe, batch_size=3, workers=2))
    assert [len(b.rows) for b in batches] == [3, 3, 2]
    assert all(b.pixels.shape == (3, 32, 32, 3) and b.pixels.dtype == np.float32 for b in batches)
    assert [r.path for b in batches for r in b.rows] == [p.name for p in paths]
    assert not batches[-1].pixels[2].any()  # padding is zeros


def test_views_are_preprocessed_and_augmented_like_the_parts(paths):
    recipe = ViewRecipe(size=32, preprocessing="caffe", augment_preset="strong", seed=5)
    task = tasks_for(paths[:1], aug_ids=(0, 3))[0]
    (raw_row, raw), (aug_row, aug) = decode_views(task, recipe)
    image = load_image(str(paths[0]), (32, 32))
    params = view_params("strong", 5, task.image_id, 3)
    np.testing.assert_array_equal(raw, preprocess(image.copy(), "caffe"))
    np.testing.assert_array_equal(aug, preprocess(apply_augmentation(image, params), "caffe"))
    assert raw_row.aug_params == "{}" and aug_row.aug_id == 3 and '"preset": "strong"' in aug_row.aug_params


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_broken_files_reported_and_run_goes_on(tmp_path, paths):
    zoo = broken_zoo(tmp_path / "zoo")
    mixed = [paths[0], *zoo.values(), paths[1]]
    batches = list(iter_batches(tasks_for(mixed), ViewRecipe(size=32, preprocessing="tf"),
                                batch_size=4, workers=2))
    rows = [r for b in batches for r in b.rows]
    errors = {path: reason for b in batches for path, _, reason in b.errors}
    assert [r.path for r in rows] == [paths[0].name, paths[1].name]
    assert set(errors) == {p.name for p in zoo.values()}
    assert errors["zero.jpg"] == "empty file" and errors["text.png"] == "not an image"


def test_prefetch_is_bounded(paths, monkeypatch):
    started, lock = [0], threading.Lock()
    real = loader.decode_views

    def counting(task, recipe):
        with lock:
            started[0] += 1
        return real(task, recipe)

    monkeypatch.setattr(loader, "decode_views", counting)
    consumed, ahead = 0, []
    for batch in iter_batches(tasks_for(paths * 5), ViewRecipe(size=32, preprocessing="raw"),
                              batch_size=2, workers=2, prefetch_batches=3):
        consumed += len(batch.rows)
        ahead.append(started[0] - consumed)
    assert consumed == 40
    assert max(ahead) <= 3 * 2  # never more than prefetch_batches * batch_size decoded ahead


def test_batch_size_must_be_positive(paths):
    with pytest.raises(ValueError, match="batch_size must be >= 1; got 0"):
        next(iter_batches(tasks_for(paths), ViewRecipe(size=32, preprocessing="raw"), batch_size=0))


def test_bytes_that_no_longer_hash_to_the_id_are_refused_not_decoded(tmp_path, paths):
    recipe = ViewRecipe(size=32, preprocessing="raw")
    task, other = tasks_for(paths[:2])
    rewritten = tmp_path / "rewritten.png"
    rewritten.write_bytes(paths[1].read_bytes())  # another image's bytes under task's id
    stale = dataclasses.replace(task, file=str(rewritten), size_bytes=paths[0].stat().st_size)
    batches = list(iter_batches([stale, other], recipe, batch_size=2, workers=2))
    assert [r.image_id for b in batches for r in b.rows] == [other.image_id]
    ((path, image_id, reason),) = [e for b in batches for e in b.errors]
    assert (path, image_id) == (task.path, task.image_id)
    assert reason.startswith(f"changed since scan ({paths[0].stat().st_size} -> "
                             f"{paths[1].stat().st_size} bytes)")
    assert reason.endswith("rerun featurestore scan")
