"""Nearest-neighbour search: exactness, own-view exclusion, range pairs, indexes."""

import numpy as np
import pytest

from featurestore import FeatureStoreError, Store
from featurestore.index import IndexStaleError, SimilarityIndex, _append_npy
from featurestore.similarity import exact_search, pairs_within, precision_at_k
from tests.test_tables import make_lineage


def brute_force(Q, X, k, metric):
    if metric == "cosine":
        Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True)
        Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
        D = 1 - Qn @ Xn.T
    else:
        D = np.sqrt(((Q[:, None, :] - X[None, :, :]) ** 2).sum(-1))
    idx = np.argsort(D, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(D, idx, axis=1), idx


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_exact_search_matches_brute_force_across_blocks(metric):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((500, 24)).astype(np.float32)
    Q = rng.standard_normal((37, 24)).astype(np.float32)
    # block_bytes forces 37-query blocks of 10 base rows: 50 merges.
    got = exact_search(Q, X, 7, metric=metric, block_bytes=37 * 10 * 4)
    dist, idx = brute_force(Q.astype(np.float64), X.astype(np.float64), 7, metric)
    np.testing.assert_array_equal(got.index, idx)
    np.testing.assert_allclose(got.distance, dist, rtol=1e-4, atol=1e-4)


def test_own_group_is_never_a_neighbour():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((60, 8)).astype(np.float32)
    groups = np.repeat(np.arange(20), 3)  # each image with two augmented views
    base[1::3] = base[0::3] + 1e-3        # views are the closest rows of all
    base[2::3] = base[0::3] - 1e-3
    res = exact_search(base[0::3], base, 5, query_groups=np.arange(20), base_groups=groups,
                       block_bytes=20 * 7 * 4)
    assert not np.any(groups[res.index] == np.arange(20)[:, None])
    plain = exact_search(base[0::3], base, 3)
    assert np.all(groups[plain.index] == np.arange(20)[:, None])  # without exclusion they win


def test_fewer_rows_than_k_pads_with_minus_one():
    X = np.eye(3, dtype=np.float32)
    res = exact_search(X[:1], X, 5)
    assert res.index[0, :3].tolist() == [0, 1, 2] and res.index[0, 3:].tolist() == [-1, -1]
    assert np.isinf(res.distance[0, 3:]).all()


def test_precision_at_k_on_a_constructed_case():
    # Two tight, well separated classes and one query sitting in the wrong cluster.
    a = np.array([[1.0, 0.0]] * 5) + np.linspace(0, 0.01, 5)[:, None]
    b = np.array([[0.0, 1.0]] * 5) + np.linspace(0, 0.01, 5)[:, None]
    X = np.vstack([a, b]).astype(np.float32)
    labels = np.array(["a"] * 5 + ["b"] * 5)
    queries = np.array([[1.0, 0.05], [0.05, 1.0], [1.0, 0.02]], dtype=np.float32)
    res = exact_search(queries, X, 4)
    p = precision_at_k(labels[res.index], np.array(["a", "b", "b"]))
    np.testing.assert_allclose(p, [1.0, 1.0, 0.0])


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_pairs_within_finds_exactly_the_close_pairs(metric):
    rng = np.random.default_rng(2)
    X = rng.standard_normal((120, 16)).astype(np.float32)
    X[50] = X[7] + 1e-4
    X[99] = X[7] - 1e-4
    dist, _ = brute_force(X.astype(np.float64), X.astype(np.float64), 120, metric)
    threshold = 0.01
    pairs = pairs_within(X, threshold, metric=metric, block_bytes=4 * 30 * 30)
    assert set(zip(pairs.i, pairs.j)) == {(7, 50), (7, 99), (50, 99)}
    with pytest.raises(FeatureStoreError, match="Unknown metric"):
        pairs_within(X, threshold, metric="dot")


def clustered_table(store, n=3000, d=32, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((30, d)).astype(np.float32) * 3
    labels = rng.integers(0, 30, n)
    X = centers[labels] + rng.standard_normal((n, d)).astype(np.float32)
    lin = make_lineage()
    with store.writer(lin) as w:
        w.append(X, image_id=[f"{i:064x}" for i in range(n)], label=labels.astype(str),
                 split=["train"] * n)
    return lin, X


def test_exact_index_round_trip_and_staleness(tmp_path):
    store = Store(tmp_path)
    lin, X = clustered_table(store, n=400)
    reader = store.open(lin)
    index = SimilarityIndex.build(reader, metric="l2")
    assert index.kind == "exact"
    res = index.search(X[:10], 5)
    ref = exact_search(X[:10], X, 5, metric="l2")
    np.testing.assert_array_equal(res.index, ref.index)
    with store.writer(lin) as w:
        w.append(X[:3], image_id=["x", "y", "z"])
    with pytest.raises(IndexStaleError, match="rebuild"):
        SimilarityIndex.load(store.open(lin), metric="l2")
    with pytest.raises(FeatureStoreError, match="no cosine index"):
        SimilarityIndex.load(store.open(lin), metric="cosine")


def test_hnsw_recall_against_exact_is_measured(tmp_path):
    pytest.importorskip("faiss")
    store = Store(tmp_path)
    lin, X = clustered_table(store)
    reader = store.open(lin)
    hnsw = SimilarityIndex.build(reader, kind="hnsw")
    assert hnsw.kind == "hnsw"
    queries = X[::30]
    groups = np.arange(len(X))
    approx = hnsw.search(queries, 10, query_groups=groups[::30], base_groups=groups)
    exact = exact_search(queries, X, 10, query_groups=groups[::30], base_groups=groups)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx.index, exact.index)])
    assert recall >= 0.9, recall
    assert not np.any(approx.index == groups[::30][:, None])  # own row excluded
    np.testing.assert_allclose(np.sort(approx.distance[:, 0]), np.sort(exact.distance[:, 0]),
                               atol=0.05)


@pytest.mark.parametrize("kind", ["exact", "hnsw"])
def test_extend_learns_new_rows_like_a_rebuild(tmp_path, kind):
    if kind == "hnsw":
        pytest.importorskip("faiss")
    store = Store(tmp_path)
    lin, X = clustered_table(store, n=300)
    SimilarityIndex.build(store.open(lin), kind=kind)
    for start, stop in ((0, 5), (5, 12)):  # twice: the second extends an extended index
        with store.writer(lin) as w:
            w.append(X[start:stop] + 0.5, image_id=[f"new{i}" for i in range(start, stop)])
        extended = SimilarityIndex.extend(store.open(lin))
    assert extended.rows == len(store.open(lin)) == 312 and extended.kind == kind
    everything = np.concatenate([X, X[:12] + 0.5])
    found = extended.search(everything[-12:], 3)
    if kind == "exact":
        ref = exact_search(everything[-12:], everything, 3)
        np.testing.assert_array_equal(found.index, ref.index)
        # An extend killed after its rows and header, before index.json: they are ignored.
        assert _append_npy(extended.directory / "vectors.npy", 312, np.ones((2, 32), np.float32))
        reloaded = SimilarityIndex.load(store.open(lin))
        assert reloaded.rows == 312 and reloaded._base.shape == (312, 32)
    else:
        assert (found.index[:, 0] >= 300).all()  # each new row finds itself
