"""index, search, eval-search and near-duplicates on real digit features."""

import hashlib

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from sklearn.datasets import load_digits

from featurestore import FeatureStoreError, Store
from pipelines.cli import main
from pipelines.similar.evaluate import EvalSearchConfig, comparison_table, run_eval_search
from pipelines.similar.index import IndexConfig, run_index
from pipelines.similar.near_duplicates import NearDuplicatesConfig, run_near_duplicates
from pipelines.similar.search import SearchConfig, run_search
from tests.test_tables import make_lineage


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    """Two tables of the 1,797 real digits: clean pixels ("max") and noisy ones ("avg").

    Each image also has two augmented views (aug_id 1, 2) that sit right next
    to it, so any leak of own views into the neighbours would show.
    """
    root = tmp_path_factory.mktemp("search")
    digits = load_digits()
    X = digits.data.astype(np.float32)
    n = len(X)
    ids = [hashlib.sha256(f"digit-{i}".encode()).hexdigest() for i in range(n)]
    labels = digits.target.astype(str)
    splits = np.where(np.arange(n) % 5 == 0, "test", "train")
    store = Store(root / "store")
    rng = np.random.default_rng(0)
    for pool, noise in (("max", 0.0), ("avg", 6.0)):
        base = X + noise * rng.standard_normal(X.shape).astype(np.float32)
        with store.writer(make_lineage(pool=pool)) as w:
            w.append(base, image_id=ids, label=labels, split=splits,
                     path=[f"{lab}/{i:04d}.png" for i, lab in enumerate(labels)])
            for aug in (1, 2):
                w.append(base + 0.01 * aug, image_id=ids, aug_id=[aug] * n, label=labels,
                         split=splits)
    return store, ids, labels, X


def test_search_by_id_excludes_the_image_and_its_views(digits_store):
    store, ids, labels, _ = digits_store
    run_index(IndexConfig(store=store.root, table="densenet121/max"))
    result = run_search(SearchConfig(store=store.root, table="densenet121/max",
                                     query=ids[0][:10], k=10))
    assert list(result["rank"]) == list(range(1, 11))
    assert ids[0] not in set(result["image_id"])
    assert (result["label"] == labels[0]).all()  # a zero among zeros
    assert result["distance"].is_monotonic_increasing
    # Same neighbours as brute force over the raw and augmented rows of other images.
    X = store.open("densenet121/max").read_features()
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    dist = 1 - Xn @ Xn[0]
    dist[[0, len(ids), 2 * len(ids)]] = np.inf  # the image and its two views
    np.testing.assert_allclose(result["distance"], np.sort(dist)[:10], atol=1e-5)


def test_search_by_image_file(digits_store, tmp_path):
    store, ids, labels, _ = digits_store
    query = tmp_path / "scan.png"
    query.write_bytes(b"digit-7")  # its SHA-256 is the id of row 7
    by_file = run_search(SearchConfig(store=store.root, table="densenet121/max",
                                      query=str(query), k=5))
    by_id = run_search(SearchConfig(store=store.root, table="densenet121/max", query=ids[7],
                                    k=5))
    pd.testing.assert_frame_equal(by_file, by_id)
    with pytest.raises(FeatureStoreError, match="matches no image"):
        run_search(SearchConfig(store=store.root, table="densenet121/max", query="ffffffffff"))


def test_eval_search_compares_tables_per_class(digits_store):
    store, *_ = digits_store
    result = run_eval_search(EvalSearchConfig(store=store.root, ks=(10, 20),
                                              queries=(100, 300)))
    overall = result[(result.label == "all") & (result.queries == 300) & (result.k == 10)]
    by_name = dict(zip(overall.name, overall.precision))
    # Own views excluded: clean digits still reach ~0.95, noisy pixels far less.
    assert 0.9 <= by_name["densenet121/max/32"] < 1.0  # tables by their Lineage.name
    assert by_name["densenet121/avg/32"] < by_name["densenet121/max/32"] - 0.1
    per_class = result[(result.queries == 300) & (result.k == 20) & (result.label != "all")]
    assert per_class.groupby("name")["n_queries"].sum().tolist() == [300, 300]
    side_by_side = comparison_table(result)
    assert list(side_by_side.index)[-1] == "all" and side_by_side.shape == (11, 4)
    saved = pd.read_parquet(store.root / "search_eval.parquet")
    assert len(saved) == len(result)


def test_eval_search_names_old_rows_anew_and_never_averages_two_tables_of_one_name(tmp_path):
    from pipelines.similar.evaluate import _save

    columns = ["table", "name", "queries", "k", "label", "n_queries", "precision", "metric"]
    a, b = "densenet121-max-32-aaaaaaaaaaaa", "densenet121-max-32-bbbbbbbbbbbb"
    path = tmp_path / "search_eval.parquet"
    pd.DataFrame([(a, "densenet121/max", 50, 5, "all", 50, 0.8, "cosine")],  # older spelling
                 columns=columns).to_parquet(path)
    _save(path, pd.DataFrame([(a, "densenet121/max/32", 100, 5, "all", 100, 0.9, "cosine"),
                              (b, "densenet121/max/32", 100, 5, "all", 100, 0.5, "cosine")],
                             columns=columns))
    saved = pd.read_parquet(path)
    assert set(saved["name"]) == {"densenet121/max/32"} and len(saved) == 3
    side_by_side = comparison_table(saved)
    assert sorted(side_by_side.loc["all"].tolist()) == [0.5, 0.9]  # two columns, not a mean


def test_eval_search_cli_prints_tables_side_by_side(digits_store):
    store, *_ = digits_store
    out = CliRunner().invoke(main, ["eval-search", "--store", str(store.root), "--k", "10",
                                    "--queries", "64"])
    assert out.exit_code == 0, out.output
    assert "densenet121/max/32" in out.output and "densenet121/avg/32" in out.output
    assert "own augmented views excluded" in out.output


def test_near_duplicates_flag_cross_split_pairs(tmp_path):
    store = Store(tmp_path / "store")
    rng = np.random.default_rng(3)
    X = rng.standard_normal((50, 16)).astype(np.float32)
    X[40] = X[3] * 1.0001                      # the same scan re-saved, in another split
    X[41] = X[4] + 1e-5                        # a duplicate inside train
    splits = ["train"] * 50
    splits[40] = "test"
    with store.writer(make_lineage()) as w:
        w.append(X, image_id=[f"{i:064x}" for i in range(50)], label=["a"] * 50, split=splits)
        w.append(X[:5] + 1e-6, image_id=[f"{i:064x}" for i in range(5)], aug_id=[1] * 5)
    pairs = run_near_duplicates(NearDuplicatesConfig(store=store.root, table="densenet121/max",
                                                     threshold=1e-3))
    got = {(a[-2:], b[-2:]): leak for a, b, leak in
           zip(pairs.image_id_a, pairs.image_id_b, pairs.leakage)}
    assert got == {("03", "28"): True, ("04", "29"): False}  # augmented views are not pairs
    out = CliRunner().invoke(main, ["near-duplicates", "--store", str(store.root), "--table",
                                    "densenet121/max", "--threshold", "0.001"])
    assert "2 near-duplicate pairs" in out.output and "1 cross splits (leakage)" in out.output


@pytest.mark.parametrize("threshold, allowed", [
    ("nan", "a finite number > 0"), ("inf", "a finite number > 0"),
    ("-0.1", "a finite number > 0"), ("0", "a finite number > 0"),
    ("2.5", "at most 2 for cosine")])
def test_near_duplicates_refuse_a_threshold_that_cannot_mean_anything(tmp_path, threshold,
                                                                       allowed):
    store = Store(tmp_path / "store")
    with store.writer(make_lineage()) as w:
        w.append(np.eye(3, 16, dtype=np.float32), image_id=[f"{i:064x}" for i in range(3)])
    out = CliRunner().invoke(main, ["near-duplicates", "--store", str(store.root), "--table",
                                    "densenet121/max", "--threshold", threshold])
    assert out.exit_code == 2, out.output
    (line,) = out.output.strip().splitlines()  # one line, no traceback
    assert line.startswith(f"Error: threshold must be {allowed}")
    assert line.endswith(f"got {float(threshold)}.")
    assert not list(store.root.glob("tables/*/near_duplicates.parquet"))  # nothing written


def test_new_query_image_is_extracted_with_the_tables_recipe(tmp_path):
    from PIL import Image, PngImagePlugin

    from pipelines.demo.data import write_digits_dataset
    from pipelines.extract.run import ExtractConfig, run_extract

    dataset = tmp_path / "digits"
    write_digits_dataset(dataset, size=32)
    for path in sorted(dataset.rglob("*.png"))[60:]:  # keep 60 images: a fast extract
        path.unlink()
    store = tmp_path / "store"
    run_extract(ExtractConfig(dataset=dataset, store=store, pool="max", weights="none",
                              image_size=32, workers=1, progress=False))
    original = sorted(dataset.rglob("*.png"))[0]
    # Same pixels, different bytes: a new image id that must be extracted first.
    query = tmp_path / "rescan.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("scanner", "gate 4")
    Image.open(original).save(query, pnginfo=info)
    result = run_search(SearchConfig(store=store, table="densenet121/max", query=str(query),
                                     k=3))
    assert result["path"].iloc[0] == original.relative_to(dataset).as_posix()
    assert result["distance"].iloc[0] < 1e-5


def test_new_query_needs_the_tables_weights_file():
    from featurestore import LineageMismatchError
    from pipelines.extract.featurize import engine_settings_for

    lineage = make_lineage(weights="file:scanner-finetuned.h5", weights_sha256="ab" * 32)
    with pytest.raises(LineageMismatchError, match="pass that file"):
        engine_settings_for(lineage)
