"""The extract stage end to end: CLI, resume after kill -9, errors table, shards, backends.

Tiny images, random weights (``--weights none``) and 32x32 inputs keep every
run to a few seconds; DenseNet121 is the backbone throughout.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from click.testing import CliRunner

from featurestore import Store
from pipelines.extract.augment import apply_augmentation
from pipelines.backbones.registry import create_backbone, pooled_model, preprocess
from pipelines.extract.run import ExtractConfig, command, run_extract
from pipelines.extract.errors import read_errors
from pipelines.extract.images import load_image
from tests.image_zoo import gradient_rgb, image_folder, png_header_only, save

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning",
                                        "ignore::PIL.Image.DecompressionBombWarning")

REPO = Path(__file__).resolve().parents[1]
TINY = dict(weights="none", image_size=32, batch_size=8, progress=False, workers=1)


def config(dataset, store, **overrides):
    return ExtractConfig(dataset=dataset, store=store, **{**TINY, **overrides})


def table(store, pool):
    """``(ids sorted by (image_id, aug_id), features in that order, metadata frame)``."""
    reader = Store(store).open(f"densenet121/{pool}")
    X, _, ids, _ = reader.to_numpy()
    order = np.argsort(ids, order=["image_id", "aug_id"])
    frame = reader.to_pandas().set_index(["image_id", "aug_id"]).sort_index()
    return ids[order], X[order], frame


def assert_same_tables(store_a, store_b, pools=("max", "avg")):
    for pool in pools:
        ids_a, X_a, _ = table(store_a, pool)
        ids_b, X_b, _ = table(store_b, pool)
        assert len(set(ids_a.tolist())) == len(ids_a)  # one row per (image, view)
        np.testing.assert_array_equal(ids_a, ids_b)
        np.testing.assert_array_equal(X_a, X_b)  # bit for bit


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "images"
    image_folder(root, n_per_class=8)
    return root


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """One uninterrupted run, both pools, two augmented views per training image."""
    store = tmp_path_factory.mktemp("reference") / "store"
    result = run_extract(config(dataset, store, augment=2, augment_preset="strong"))
    assert result.exit_code == 0
    return store, result


def test_cli_end_to_end_and_rerun_is_a_no_op(dataset, tmp_path):
    store = tmp_path / "store"
    args = [str(dataset), "--store", str(store), "--weights", "none", "--image-size", "32",
            "--pool", "both", "--augment", "1", "--batch-size", "8", "--format", "both",
            "--workers", "1", "--quiet"]
    first = CliRunner().invoke(command, args)
    assert first.exit_code == 0, first.output
    assert "Extracted" in first.output and "densenet121-max-32-" in first.output
    for pool in ("max", "avg"):
        reader = Store(store).open(f"densenet121/{pool}")
        assert reader.dimension == 1024
        frame = reader.to_pandas()
        n_train = (frame["split"] == "train").sum() // 2
        assert len(frame) == 16 + n_train  # raw views + one view per training image
        for fmt in ("hdf5", "parquet"):
            assert len(Store(store).open(f"densenet121/{pool}", format=fmt)) == len(frame)
    again = CliRunner().invoke(command, args)
    assert again.exit_code == 0 and "Extracted 0 views" in again.output


def test_bad_arguments_exit_2_naming_the_argument(dataset, tmp_path):
    bad_shard = CliRunner().invoke(command, [str(dataset), "--store", str(tmp_path / "s"),
                                             "--weights", "none", "--shard", "3/2"])
    assert bad_shard.exit_code == 2 and "shard must be K/N" in bad_shard.output
    bad_size = CliRunner().invoke(command, [str(dataset), "--store", str(tmp_path / "s"),
                                            "--backbone", "xception", "--image-size", "32"])
    assert bad_size.exit_code == 2 and "at least 71" in bad_size.output


def test_wrong_weights_file_fails_before_any_row(dataset, tmp_path):
    wrong = tmp_path / "resnet50.weights.h5"
    create_backbone("resnet50", input_size=32).save_weights(wrong)
    result = CliRunner().invoke(command, [str(dataset), "--store", str(tmp_path / "store"),
                                          "--weights", str(wrong), "--image-size", "32",
                                          "--workers", "1", "--quiet"])
    assert result.exit_code == 2
    assert "does not fit backbone 'densenet121'" in result.output
    assert all(info.rows == 0 for info in Store(tmp_path / "store").tables())


def test_both_pools_in_one_pass_equal_separate_runs(dataset, reference, tmp_path):
    store, _ = reference
    for pool in ("max", "avg"):
        run_extract(config(dataset, tmp_path / pool, pool=pool, augment=2, augment_preset="strong"))
        assert_same_tables(store, tmp_path / pool, pools=(pool,))


def test_augmented_view_regenerates_from_its_stored_params(dataset, reference):
    store, _ = reference
    _, _, frame = table(store, "avg")
    row = frame[frame.index.get_level_values("aug_id") == 2].iloc[0]
    image_id = row.name[0]
    params = json.loads(row["aug_params"])
    assert params["preset"] == "strong"
    pixels = load_image(str(dataset / row["path"]), (32, 32))
    view = preprocess(apply_augmentation(pixels, params), "torch")
    batch = np.zeros((8, 32, 32, 3), np.float32)
    batch[5] = view  # any slot: features do not depend on the batch position
    model = pooled_model(create_backbone("densenet121", input_size=32, seed=0), ("avg",))
    out = model.predict_on_batch(batch)
    features = np.asarray(out[0] if isinstance(out, list) else out)[5]
    ids, X, _ = table(store, "avg")
    stored = X[(ids["image_id"] == image_id) & (ids["aug_id"] == 2)][0]
    np.testing.assert_array_equal(features, stored)


def test_only_train_split_is_augmented_unless_asked(reference):
    store, _ = reference
    _, _, frame = table(store, "max")
    views = frame.reset_index().groupby("image_id")["aug_id"].max()
    splits = frame.reset_index().groupby("image_id")["split"].first()
    assert (views[splits == "train"] == 2).all() and (views[splits != "train"] == 0).all()
    lineage = Store(store).resolve("densenet121/max")
    assert lineage.augmentation == {"preset": "strong", "views": 2, "seed": 0, "splits": ["train"]}
    assert lineage.weights == "random:0" and lineage.weights_sha256 is None


def test_shards_merge_into_the_single_run(dataset, reference, tmp_path):
    store, _ = reference
    sharded = tmp_path / "sharded"
    counts = []
    for k in (1, 2):
        result = run_extract(config(dataset, sharded, augment=2, augment_preset="strong",
                                    shard=f"{k}/2"))
        counts.append(result.views_written)
    assert all(counts) and sum(counts) == reference[1].views_written
    commit = run_extract(config(dataset, sharded, augment=2, augment_preset="strong"))
    assert commit.views_written == 0 and commit.merged["rows"] == 2 * sum(counts)  # two tables
    assert_same_tables(store, sharded)


def broken_dataset(root: Path) -> dict:
    """Good images plus files that pass the scan but fail to decode; returns {path: reason}."""
    image_folder(root, n_per_class=3)
    good = gradient_rgb(64, 48)
    jpeg = root / "cat_a" / "truncated.jpg"
    save(jpeg, good, quality=95)
    jpeg.write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) * 2 // 3])
    png = root / "cat_b" / "truncated.png"
    save(png, good)
    png.write_bytes(png.read_bytes()[: len(png.read_bytes()) // 2])
    png_header_only(root / "cat_b" / "bomb.png", 11_000, 10_000)
    return {"cat_a/truncated.jpg": "truncated image", "cat_b/truncated.png": "truncated image",
            "cat_b/bomb.png": "too many pixels"}


def test_errors_table_records_bad_files_and_the_run_goes_on(tmp_path):
    expected = broken_dataset(tmp_path / "data")
    store = tmp_path / "store"
    Store(store)
    from pipelines.scan import ScanConfig, run_scan

    run_scan(ScanConfig(dataset=tmp_path / "data", store=store, progress=False))
    vanished = tmp_path / "data" / "cat_a" / "000.png"
    vanished_bytes = vanished.read_bytes()
    vanished.unlink()  # gone after the scan
    changed = tmp_path / "data" / "cat_b" / "001.jpg"
    changed.write_bytes(changed.read_bytes() + b"\0" * 10)  # rewritten after the scan
    expected.update({"cat_a/000.png": "file not found", "cat_b/001.jpg": "changed since scan"})

    result = CliRunner().invoke(command, [str(tmp_path / "data"), "--store", str(store),
                                          "--weights", "none", "--image-size", "32",
                                          "--workers", "1", "--quiet"])
    assert result.exit_code == 3, result.output
    assert "5 file(s) failed" in result.output
    errors = read_errors(store)
    assert len(errors) == 2 * len(expected)  # listed for both tables
    for path, reason in expected.items():
        assert errors[errors["path"] == path]["reason"].str.startswith(reason).all(), path
    assert len(Store(store).open("densenet121/max")) == 6 - 2  # the good images, all there

    vanished.write_bytes(vanished_bytes)  # restored: extracted now, and off the errors list
    rerun = run_extract(config(tmp_path / "data", store))
    assert rerun.views_written == 1 and rerun.exit_code == 3 and len(rerun.errors) == 4
    assert "cat_a/000.png" not in set(read_errors(store)["path"])


_KILLABLE = textwrap.dedent("""
    import sys
    from pipelines.extract.run import ExtractConfig, run_extract
    if __name__ == "__main__":
        rows, seconds = (10**6, 0.05) if sys.argv[4] == "by-time" else (4, None)
        run_extract(ExtractConfig(dataset=sys.argv[1], store=sys.argv[2], weights="none",
                                  image_size=32, batch_size=4, rows_per_part=rows,
                                  commit_seconds=seconds, augment=2, augment_preset="strong",
                                  workers=int(sys.argv[3]), progress=False))
""")


@pytest.mark.parametrize("workers, commits", [(1, "by-rows"), (2, "by-rows"), (1, "by-time")])
def test_resume_right_after_kill_9_equals_uninterrupted_run(dataset, reference, tmp_path,
                                                             workers, commits):
    """Parts are committed every 4 rows, or (by-time) every 0.05 s of a million-row part;
    the rerun starts the instant the kill is sent, while the killed run may still hold
    the table's lock, and waits for it rather than failing."""
    store = tmp_path / "store"
    shutil.copytree(reference[0], store, ignore=shutil.ignore_patterns("tables", "extract_*"))
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE, str(dataset), str(store),
                             str(workers), commits], cwd=REPO, stderr=subprocess.DEVNULL)
    parts = lambda: list(store.glob("tables/*/hdf5/part-*"))  # noqa: E731
    deadline = time.time() + 120
    while len(parts()) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    children = psutil.Process(proc.pid).children()
    assert len(children) >= (workers if workers > 1 else 0)
    os.kill(proc.pid, signal.SIGKILL)
    resumed = run_extract(config(dataset, store, augment=2, augment_preset="strong"))
    proc.wait()
    # Orphaned workers notice within a poll interval and exit: no stray processes.
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"workers {[p.pid for p in alive]} outlived their killed parent"
    assert 0 < resumed.views_skipped < reference[1].views_written
    assert_same_tables(reference[0], store)


_JAX_CHECK = textwrap.dedent("""
    import json, sys
    import numpy as np
    from pipelines.extract.run import ExtractConfig, run_extract
    from featurestore import Store
    result = run_extract(ExtractConfig(dataset=sys.argv[1], store=sys.argv[2],
                                       weights=sys.argv[3], image_size=32, batch_size=8,
                                       workers=1, progress=False))
    X, _, ids, _ = Store(sys.argv[2]).open("densenet121/avg").to_numpy()
    order = np.argsort(ids, order=["image_id", "aug_id"])
    np.save(sys.argv[4], X[order])
    import hashlib, keras
    from pipelines.backbones.registry import create_backbone
    random_init = create_backbone("efficientnetb0", input_size=32, seed=5).get_weights()
    digest = hashlib.sha256(b"".join(np.asarray(w, np.float32).tobytes() for w in random_init))
    print(json.dumps({"backend": keras.config.backend(), "exit": result.exit_code,
                      "random_init": digest.hexdigest(),
                      "tensorflow_imported": any(m.split(".")[0] == "tensorflow"
                                                 for m in sys.modules)}))
""")


def test_second_backend_jax_matches_tensorflow_and_never_imports_it(dataset, tmp_path):
    pytest.importorskip("jax")
    weights = tmp_path / "d121.weights.h5"
    create_backbone("densenet121", input_size=32, seed=11).save_weights(weights)
    tf_store = tmp_path / "tf"
    run_extract(config(dataset, tf_store, weights=str(weights)))
    _, X_tf, _ = table(tf_store, "avg")
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", _JAX_CHECK, str(dataset), str(tmp_path / "jax"),
                          str(weights), str(tmp_path / "jax.npy")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    random_init = create_backbone("efficientnetb0", input_size=32, seed=5).get_weights()
    digest = hashlib.sha256(b"".join(np.asarray(w, np.float32).tobytes() for w in random_init))
    assert report == {"backend": "jax", "exit": 0, "tensorflow_imported": False,
                      "random_init": digest.hexdigest()}  # random:5 is the same everywhere
    np.testing.assert_allclose(np.load(tmp_path / "jax.npy"), X_tf, rtol=1e-4, atol=1e-4)
