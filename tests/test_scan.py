"""Tests of the dataset scan, the manifest, the split placement and the ``scan`` command."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import featurestore.scan as scan_module
from featurestore.errors import FeatureStoreError, ScanError
from featurestore.layout import CLASS_FOLDERS, SPLIT_FOLDERS
from featurestore.manifest import Manifest
from featurestore.scan import scan_dataset
from featurestore.splits import assign_splits, split_targets
from pipelines.demo.data import write_digits_dataset
from pipelines.scan import ScanConfig, command, run_scan

TARGETS = split_targets(0.15, 0.15)


def make_image(path: Path, value: int, fmt: str = "PNG") -> Path:
    """Write a tiny grayscale image whose bytes are unique for each ``value`` in 0..65535."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.array([[value // 256, value % 256], [7, 7]], dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def make_classes(root: Path, counts: dict[str, int], start: int = 0) -> None:
    value = start
    for label, n in counts.items():
        for i in range(n):
            make_image(root / label / f"img{value:05d}.png", value)
            value += 1


def scan(root, manifest_path, **kwargs):
    return scan_dataset(root, manifest_path, progress=False, **kwargs)


def assert_within_one_of_target(manifest: Manifest) -> None:
    counts = manifest.counts()
    for label in counts.columns:
        n = counts[label].sum()
        for split, fraction in TARGETS.items():
            assert abs(counts[label].get(split, 0) - fraction * n) <= 1, (label, split, counts[label].to_dict())


def splits_by_path(manifest_path) -> dict[str, str]:
    with Manifest(manifest_path) as manifest:
        images = manifest.images()
    return dict(zip(images["path"], images["split"]))


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> Path:
    return write_digits_dataset(tmp_path_factory.mktemp("digits") / "digits", size=16)


# -- layouts and split placement ------------------------------------------------------------


def test_digits_split_is_stratified_and_seeded(digits_root, tmp_path):
    result = scan(digits_root, tmp_path / "a.sqlite")
    assert result.layout == CLASS_FOLDERS
    assert result.added == 1797 and not result.rejected and not result.leakage
    with Manifest(tmp_path / "a.sqlite") as manifest:
        assert sorted(manifest.counts().columns) == [str(d) for d in range(10)]
        assert_within_one_of_target(manifest)
        assert set(manifest.images()[["width", "height", "mode", "format"]].itertuples(index=False)) == {
            (16, 16, "L", "PNG")
        }
    scan(digits_root, tmp_path / "b.sqlite")
    scan(digits_root, tmp_path / "c.sqlite", seed=1)
    assert splits_by_path(tmp_path / "a.sqlite") == splits_by_path(tmp_path / "b.sqlite")
    assert splits_by_path(tmp_path / "a.sqlite") != splits_by_path(tmp_path / "c.sqlite")


def test_demo_dataset_is_idempotent(digits_root):
    first = digits_root / "0" / "0000.png"
    mtime = first.stat().st_mtime_ns
    write_digits_dataset(digits_root, size=16)
    assert first.stat().st_mtime_ns == mtime
    assert sum(1 for _ in digits_root.glob("*/*.png")) == 1797


def test_split_folder_layout_takes_splits_from_folder_names(tmp_path):
    root = tmp_path / "ds"
    make_image(root / "train" / "cat" / "a.png", 1)
    make_image(root / "Valid" / "cat" / "b.png", 2)
    make_image(root / "validation" / "dog" / "c.png", 3)
    make_image(root / "TEST" / "dog" / "d.png", 4)
    result = scan(root, tmp_path / "m.sqlite")
    assert result.layout == SPLIT_FOLDERS and result.added == 4
    assert splits_by_path(tmp_path / "m.sqlite") == {
        "train/cat/a.png": "train", "Valid/cat/b.png": "val",
        "validation/dog/c.png": "val", "TEST/dog/d.png": "test",
    }  # fmt: skip
    assert "train" in result.summary() and "cat" in result.summary()


def test_mixed_layout_names_the_offending_folders(tmp_path):
    make_image(tmp_path / "ds" / "train" / "cat" / "a.png", 1)
    make_image(tmp_path / "ds" / "dog" / "b.png", 2)
    with pytest.raises(ScanError, match=r"split folders \(train\).*other folders \(dog\)"):
        scan(tmp_path / "ds", tmp_path / "m.sqlite")


def test_rescan_of_grown_folder_adds_only_new_files(tmp_path, monkeypatch):
    root, path = tmp_path / "ds", tmp_path / "m.sqlite"
    make_classes(root, {"a": 20, "b": 13})
    scan(root, path)
    before = splits_by_path(path)
    make_classes(root, {"a": 9, "b": 17}, start=100)
    hashed = []
    real_hash = scan_module.hash_file
    monkeypatch.setattr(scan_module, "hash_file", lambda p: hashed.append(p) or real_hash(p))
    result = scan(root, path)
    assert (result.added, result.unchanged, result.modified, result.missing) == (26, 33, 0, 0)
    assert len(hashed) == 26
    after = splits_by_path(path)
    assert {p: after[p] for p in before} == before
    with Manifest(path) as manifest:
        assert_within_one_of_target(manifest)


def test_interrupted_scan_keeps_whole_batches_and_resumes(tmp_path, monkeypatch):
    root, path = tmp_path / "ds", tmp_path / "m.sqlite"
    make_classes(root, {"a": 10, "b": 10})
    monkeypatch.setattr(scan_module, "BATCH_SIZE", 4)
    real_hash = scan_module.hash_file
    calls = []

    def hash_then_die(p):
        calls.append(p)
        if len(calls) == 11:
            raise KeyboardInterrupt
        return real_hash(p)

    monkeypatch.setattr(scan_module, "hash_file", hash_then_die)
    with pytest.raises(KeyboardInterrupt):
        scan(root, path)
    with Manifest(path) as manifest:
        stored = manifest.images(include_missing=True)
        assert len(stored) == 8 and stored["split"].isna().all()  # two whole batches, not yet placed
        assert manifest.images().empty
    monkeypatch.setattr(scan_module, "hash_file", real_hash)
    result = scan(root, path)
    assert (result.added, result.unchanged) == (12, 8)
    with Manifest(path) as manifest:
        assert len(manifest.images()) == 20
        assert_within_one_of_target(manifest)


def test_rescan_with_other_seed_is_refused(tmp_path):
    make_classes(tmp_path / "ds", {"a": 3})
    scan(tmp_path / "ds", tmp_path / "m.sqlite")
    with pytest.raises(ScanError, match="seed=0.*seed=3"):
        scan(tmp_path / "ds", tmp_path / "m.sqlite", seed=3)


def test_bad_fractions_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="val_fraction"):
        scan(tmp_path, tmp_path / "m.sqlite", val_fraction=1.5)
    with pytest.raises(ValueError, match="train keeps images"):
        scan(tmp_path, tmp_path / "m.sqlite", val_fraction=0.5, test_fraction=0.5)


def test_identical_bytes_share_a_split_and_placement_is_within_one():
    pending = {"a": {f"id{i}": 1 for i in range(10)} | {"dup": 3}, "b": {"dup": 1, "x": 1}}
    placed = assign_splits(pending, {}, {}, TARGETS, seed=0)
    assert set(placed) == {f"id{i}" for i in range(10)} | {"dup", "x"}
    counts = Counter()
    for image_id, n in pending["a"].items():
        counts[placed[image_id]] += n
    assert all(abs(counts[s] - f * 13) < 1 for s, f in TARGETS.items())
    assert assign_splits(pending, {}, {"dup": "test"}, TARGETS, seed=0)["dup"] == "test"


# -- what is accepted and what is rejected --------------------------------------------------


def test_extensions_in_any_case_and_format_mismatch(tmp_path):
    root = tmp_path / "ds"
    make_image(root / "c" / "a.PNG", 1)
    make_image(root / "c" / "b.JpEg", 2, fmt="JPEG")
    make_image(root / "c" / "c.TIF", 3, fmt="TIFF")
    make_image(root / "c" / "d.bmp", 4, fmt="BMP")
    make_image(root / "c" / "e.png", 5, fmt="JPEG")
    result = scan(root, tmp_path / "m.sqlite")
    assert result.added == 5 and not result.rejected
    assert result.format_mismatches == [("c/e.png", "JPEG")]
    with Manifest(tmp_path / "m.sqlite") as manifest:
        formats = dict(zip(manifest.images()["path"], manifest.images()["format"]))
    assert formats == {"c/a.PNG": "PNG", "c/b.JpEg": "JPEG", "c/c.TIF": "TIFF", "c/d.bmp": "BMP", "c/e.png": "JPEG"}


def test_non_images_and_wrong_depths_are_rejected_with_reasons(tmp_path):
    root = tmp_path / "ds"
    make_image(root / "c" / "a.png", 1)
    (root / "c" / "notes.txt").write_text("x")
    (root / "c" / ".DS_Store").write_bytes(b"\0")
    (root / "c" / "README").write_text("x")
    make_image(root / "top.png", 2)
    make_image(root / "c" / "sub" / "deep.png", 3)
    (root / ".git").mkdir()
    (root / "c" / "empty.png").write_bytes(b"")
    (root / "c" / "garbage.png").write_bytes(b"definitely not a png")
    result = scan(root, tmp_path / "m.sqlite")
    reasons = dict(result.rejected)
    assert result.added == 1
    assert "extension '.txt'" in reasons["c/notes.txt"]
    assert reasons["c/.DS_Store"] == "hidden file"
    assert "no extension" in reasons["c/README"]
    assert "directly in the dataset root" in reasons["top.png"]
    assert "nested too deep" in reasons["c/sub/deep.png"]
    assert "hidden directory" in reasons[".git"]
    assert reasons["c/empty.png"] == "empty file"
    assert reasons["c/garbage.png"].startswith("not a valid PNG image")
    with Manifest(tmp_path / "m.sqlite") as manifest:
        assert sorted(manifest.rejected()["path"]) == sorted(reasons)
    assert "Rejected entries: 8" in result.summary()


def test_empty_class_folder_is_reported(tmp_path):
    make_image(tmp_path / "ds" / "c" / "a.png", 1)
    (tmp_path / "ds" / "empty").mkdir()
    (tmp_path / "ds" / "junk").mkdir()
    (tmp_path / "ds" / "junk" / "x.txt").write_text("x")
    result = scan(tmp_path / "ds", tmp_path / "m.sqlite")
    assert result.empty_class_dirs == ["empty", "junk"]
    assert "Empty class folders: 2" in result.summary()


@pytest.mark.parametrize("setup", ["empty", "only_junk", "missing", "file"])
def test_unusable_root_raises_scan_error_naming_it(tmp_path, setup):
    root = tmp_path / "ds"
    if setup == "empty":
        (root / "c").mkdir(parents=True)
    elif setup == "only_junk":
        (root / "c").mkdir(parents=True)
        (root / "c" / "bad.png").write_bytes(b"junk")
    elif setup == "file":
        root.write_text("x")
    with pytest.raises(ScanError, match=str(root)):
        scan(root, tmp_path / "m.sqlite")


def test_same_bytes_in_two_splits_is_leakage_and_under_two_labels_a_conflict(tmp_path):
    root = tmp_path / "ds"
    make_image(root / "train" / "cat" / "a.png", 1)
    make_image(root / "test" / "cat" / "a_copy.png", 1)
    make_image(root / "train" / "dog" / "b.png", 2)
    make_image(root / "train" / "cat" / "b_too.png", 2)
    make_image(root / "val" / "dog" / "c.png", 3)
    make_image(root / "val" / "dog" / "c2.png", 3)
    result = scan(root, tmp_path / "m.sqlite")
    assert [c.paths for c in result.leakage] == [("test/cat/a_copy.png", "train/cat/a.png")]
    assert [(c.labels, c.paths) for c in result.label_conflicts] == [
        (("cat", "dog"), ("train/cat/b_too.png", "train/dog/b.png"))
    ]
    with Manifest(tmp_path / "m.sqlite") as manifest:
        assert sorted(manifest.conflicts()["kind"]) == ["duplicate", "label_conflict", "leakage"]


def test_auto_split_never_separates_identical_bytes(tmp_path):
    root = tmp_path / "ds"
    make_classes(root, {"a": 12})
    for i in range(12):
        make_image(root / "a" / f"copy{i}.png", i)
    result = scan(root, tmp_path / "m.sqlite")
    assert not result.leakage
    with Manifest(tmp_path / "m.sqlite") as manifest:
        assert set(manifest.conflicts()["kind"]) == {"duplicate"}


# -- paths: symlinks, non-UTF-8 names, vanished files, roots --------------------------------


def test_symlinks_outside_the_root_are_refused(tmp_path):
    root, outside = tmp_path / "ds", tmp_path / "outside"
    make_image(root / "c" / "a.png", 1)
    make_image(outside / "secret.png", 2)
    (root / "c" / "escape.png").symlink_to(outside / "secret.png")
    (root / "escaped_dir").symlink_to(outside, target_is_directory=True)
    (root / "c" / "inside.png").symlink_to(root / "c" / "a.png")
    (root / "alias").symlink_to(root / "c", target_is_directory=True)
    result = scan(root, tmp_path / "m.sqlite")
    reasons = dict(result.rejected)
    assert reasons["c/escape.png"] == f"symlink escapes dataset root -> {outside.resolve() / 'secret.png'}"
    assert reasons["escaped_dir"].startswith("symlink escapes dataset root ->")
    assert "not followed" in reasons["alias"] and "scanned at c" in reasons["alias"]
    assert sorted(splits_by_path(tmp_path / "m.sqlite")) == ["c/a.png", "c/inside.png"]


def test_non_utf8_file_name_is_scanned_and_reopened(tmp_path):
    root = tmp_path / "ds"
    make_image(root / "c" / "a.png", 1)
    raw = os.fsencode(str(root / "c")) + b"/\xff\xfe.png"
    fd = os.open(raw, os.O_WRONLY | os.O_CREAT, 0o644)
    with os.fdopen(fd, "wb") as file:
        make_image(tmp_path / "tmp.png", 2)
        file.write((tmp_path / "tmp.png").read_bytes())
    result = scan(root, tmp_path / "m.sqlite")
    assert result.added == 2 and not result.rejected
    with Manifest(tmp_path / "m.sqlite") as manifest:
        row = manifest.images().set_index("path").loc["c/\\xff\\xfe.png"]
        assert row["raw_path"] == b"c/\xff\xfe.png"
        for key in (row, "c/\\xff\\xfe.png", b"c/\xff\xfe.png"):
            with Image.open(manifest.absolute_path(key)) as image:
                assert image.size == (2, 2)


def test_absolute_path_refuses_paths_outside_the_root(tmp_path):
    make_image(tmp_path / "ds" / "c" / "a.png", 1)
    scan(tmp_path / "ds", tmp_path / "m.sqlite")
    with Manifest(tmp_path / "m.sqlite") as manifest:
        assert manifest.absolute_path("c/a.png") == tmp_path.resolve() / "ds" / "c" / "a.png"
        with pytest.raises(FeatureStoreError, match="outside the dataset root"):
            manifest.absolute_path(b"../m.sqlite")
        with pytest.raises(FeatureStoreError, match="not in manifest"):
            manifest.absolute_path("c/nope.png")


def test_vanished_and_modified_files(tmp_path):
    root, path = tmp_path / "ds", tmp_path / "m.sqlite"
    make_classes(root, {"a": 6})
    scan(root, path)
    before = splits_by_path(path)
    (root / "a" / "img00000.png").unlink()
    make_image(root / "a" / "img00001.png", 999)
    os.utime(root / "a" / "img00001.png", ns=(1, 1))  # a different mtime, whatever the clock resolution
    result = scan(root, path)
    assert (result.added, result.unchanged, result.modified, result.missing) == (0, 4, 1, 1)
    with Manifest(path) as manifest:
        assert "a/img00000.png" not in set(manifest.images()["path"])
        every = manifest.images(include_missing=True).set_index("path")
    assert every.loc["a/img00000.png", "missing"] == 1
    assert every.loc["a/img00001.png", "split"] == before["a/img00001.png"]
    make_image(root / "a" / "img00000.png", 0)  # back again: present, same split
    assert scan(root, path).added == 0
    assert splits_by_path(path) == {**before, "a/img00001.png": before["a/img00001.png"]}


def test_another_root_into_the_same_manifest_is_refused(tmp_path):
    make_image(tmp_path / "one" / "c" / "a.png", 1)
    make_image(tmp_path / "two" / "c" / "a.png", 1)
    scan(tmp_path / "one", tmp_path / "m.sqlite")
    with pytest.raises(ScanError, match=f"{tmp_path.resolve() / 'one'}.*{tmp_path.resolve() / 'two'}"):
        scan(tmp_path / "two", tmp_path / "m.sqlite")


def test_manifest_opened_for_reading_must_exist(tmp_path):
    with pytest.raises(FeatureStoreError, match="Cannot open manifest"):
        Manifest(tmp_path / "nope.sqlite")


# -- pipeline and CLI -----------------------------------------------------------------------


def test_run_scan_creates_the_store(tmp_path):
    make_classes(tmp_path / "ds", {"a": 2})
    result = run_scan(ScanConfig(dataset=tmp_path / "ds", store=tmp_path / "store" / "s", progress=False))
    assert result.added == 2 and (tmp_path / "store" / "s" / "manifest.sqlite").is_file()


def test_cli_prints_the_summary(tmp_path):
    make_classes(tmp_path / "ds", {"cat": 4, "dog": 3})
    (tmp_path / "ds" / "notes.txt").write_text("x")
    result = CliRunner().invoke(command, [str(tmp_path / "ds"), "--store", str(tmp_path / "s"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "7 added" in result.output and "dog" in result.output and "notes.txt" in result.output


def test_cli_names_a_missing_root_and_fails(tmp_path):
    missing = tmp_path / "no-such-dataset"
    result = CliRunner().invoke(command, [str(missing), "--store", str(tmp_path / "s"), "--quiet"])
    assert result.exit_code == 2
    assert f"Error: Dataset root {missing} does not exist." in result.output


def test_cli_rejects_fractions_leaving_nothing_for_train(tmp_path):
    args = [str(tmp_path), "--store", str(tmp_path / "s"), "--val-fraction", "0.6", "--test-fraction", "0.5"]
    result = CliRunner().invoke(command, args)
    assert result.exit_code == 2 and "train keeps images" in result.output
