"""fit-embedding, derived tables and verify, on the real digit scans (their pixels as features)."""

import hashlib
import json

import numpy as np
import pytest
from click.testing import CliRunner
from keras import ops
from sklearn.datasets import load_digits

from classifiers.embedding.losses import semi_hard_negatives, triplet_loss
from classifiers.embedding.sampler import PKSampler
from classifiers.embedding.verifier import PairVerifier
from classifiers.errors import ClassifierError
from featurestore import FeatureStoreError, LineageMismatchError, Store, concat
from featurestore._io import hash_file
from featurestore.paths import table_projection, table_verifier
from pipelines.cli import main
from pipelines.embedding import FitEmbeddingConfig, extend_derived, run_fit_embedding
from pipelines.embedding.verify import VerifyConfig, run_verify
from pipelines.heads import FitHeadsConfig, load_model, run_fit_heads
from pipelines.similar.evaluate import EvalSearchConfig, run_eval_search
from tests.test_tables import make_lineage

N_IMAGES = 900  # of the 1,797 digits; the rest are "new" images for extend_derived
FIT = dict(dim=16, epochs=2, p=10, k=4, learning_rate=1e-3)  # tiny data: learn fast


def _ids(n0, n1):
    return [hashlib.sha256(f"digit-{i}".encode()).hexdigest() for i in range(n0, n1)]


def _append(writer, X, y, n0, n1):
    ids, labels = _ids(n0, n1), y[n0:n1].astype(str)
    splits = np.array(["test", "val", "train", "train", "train"])[np.arange(n0, n1) % 5]
    writer.append(X[n0:n1], image_id=ids, label=labels, split=splits)
    train = splits == "train"  # one augmented view per train image: an extra positive
    writer.append(X[n0:n1][train] + 0.5, image_id=np.array(ids)[train],
                  aug_id=[1] * int(train.sum()), label=labels[train], split=splits[train])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    digits = load_digits()
    X, y = digits.data.astype(np.float32), digits.target
    store = Store(tmp_path_factory.mktemp("embedding") / "store")
    parent = make_lineage(pool="avg")
    with store.writer(parent, formats=("hdf5", "parquet")) as w:
        _append(w, X, y, 0, N_IMAGES)
    result = run_fit_embedding(FitEmbeddingConfig(store=store.root, table="densenet121/avg",
                                                  **FIT), echo=lambda _: None)
    return store, parent, result, (X, y)


def test_derived_table_records_parent_spec_and_weights_hash(fitted):
    store, parent, result, _ = fitted
    lineage = result.lineage
    assert lineage.derived["parent_key"] == parent.key
    spec = lineage.derived["projection"]
    assert (spec["dim"], spec["loss"], spec["mining"], spec["hidden"]) == \
        (16, "triplet", "semi-hard", [])
    folder = store.table_dir(lineage)
    assert lineage.derived["weights_sha256"] == hash_file(table_projection(folder))
    assert lineage.key != parent.key and lineage.name == "densenet121/avg/32+emb16"
    # Opens by its name; the parent's name still means the parent alone.
    assert store.resolve(lineage.name) == lineage and store.resolve("densenet121/avg") == parent
    reader = store.open(lineage.name)
    assert (len(reader), reader.dimension) == (len(store.open(parent)), 16)
    assert set(reader.keys()) == set(store.open(parent).keys())
    np.testing.assert_allclose(np.linalg.norm(reader.read_features(), axis=1), 1, atol=1e-5)
    assert reader.metadata()["label"].tolist() == store.open(parent).metadata()["label"].tolist()
    assert {info.key: info.dimension for info in store.tables()}[lineage.key] == 16
    assert store.info(lineage).formats == ("hdf5", "parquet")  # the parent's formats
    assert len(result.seconds_per_epoch) == 2 and result.rows_added == len(reader)


def test_derived_table_is_never_mixed_with_its_parent(fitted):
    store, parent, result, _ = fitted
    with pytest.raises(FeatureStoreError, match="derived"):
        concat([store.open(parent), store.open(result.lineage)])
    run_fit_heads(FitHeadsConfig(store=store.root, table=result.lineage.name, heads=["logreg"],
                                 search="none", cv=2), echo=lambda _: None)
    model = load_model(store, result.lineage.key, "logreg")
    assert model.predict_proba(store.open(result.lineage).read_features()[:3]).shape == (3, 10)
    with pytest.raises(LineageMismatchError):
        load_model(store, result.lineage.key, "logreg", table=store.open(parent))
    # A projection file that is not the one the lineage names is refused before loading.
    projection = table_projection(store.table_dir(result.lineage))
    saved = projection.read_bytes()
    projection.write_bytes(saved + b"\0")
    try:
        with pytest.raises(FeatureStoreError, match="SHA-256"):
            extend_derived(store, result.lineage.key)
    finally:
        projection.write_bytes(saved)


def test_eval_search_scores_derived_table_beside_its_parent(fitted):
    store, parent, result, _ = fitted
    frame = run_eval_search(EvalSearchConfig(store=store.root, ks=(10,), queries=(200,),
                                             tables=[parent.key, result.lineage.name]))
    overall = frame[frame["label"] == "all"].set_index("table")["precision"]
    assert set(overall.index) == {parent.key, result.lineage.key}
    assert overall[result.lineage.key] > 0.8


def test_sampler_takes_p_classes_of_k_distinct_images():
    # class "a": 6 images; "b": 4; "c": 2 images with 3 views each (views fill in for K=4)
    labels = ["a"] * 6 + ["b"] * 4 + ["c"] * 8
    groups = [f"a{i}" for i in range(6)] + [f"b{i}" for i in range(4)] + \
        ["c0"] * 4 + ["c1"] * 4
    sampler = PKSampler(labels, groups, p=2, k=4, seed=0)
    labels, groups = np.array(labels), np.array(groups)
    batches = [b for _ in range(20) for b in sampler.batches()]
    seen = set()
    for batch in batches:
        assert len(batch) == 8
        classes, counts = np.unique(labels[batch], return_counts=True)
        assert len(classes) == 2 and set(counts) == {4}
        for c in classes:
            rows = batch[labels[batch] == c]
            images = set(groups[rows])
            assert len(images) == min(4, len(set(groups[labels == c])))
            seen.update(classes)
    assert seen == {"a", "b", "c"}
    with pytest.raises(ClassifierError, match=r"fewer than 2 images.*'c' \(1\)"):
        PKSampler(["a", "a", "c", "c"], ["a0", "a1", "c0", "c0"], p=2, k=2)


def test_semi_hard_mining_on_a_constructed_case():
    # 1-d embeddings: anchor 0 and its positive at 0.5 (class 0); negatives at 0.3 (harder
    # than the positive), 0.7 (semi-hard: the one to mine) and 1.5 (easy).
    emb = np.array([[0.0], [0.5], [0.3], [0.7], [1.5]], np.float32)
    labels = np.array([0, 0, 1, 1, 1])
    dist = np.abs(emb - emb.T)
    mined = ops.convert_to_numpy(semi_hard_negatives(dist, labels))
    assert mined[0, 1] == 3
    # Anchor 0.5, positive 0 (d=0.5): negatives 0.3 and 0.7 are nearer (0.2), 1.5 is farther.
    assert mined[1, 0] == 4
    # No negative farther than the positive: the farthest of the nearer ones.
    far = np.array([[0.0], [2.0], [0.3], [0.7], [1.5]], np.float32)
    assert ops.convert_to_numpy(semi_hard_negatives(np.abs(far - far.T), labels))[0, 1] == 4
    loss = float(ops.convert_to_numpy(triplet_loss(labels, emb, margin=0.3)))
    expected = []  # the same rule by brute force, every (anchor, positive) of both classes
    for a in range(5):
        for p in range(5):
            if a == p or labels[a] != labels[p]:
                continue
            d_ap = dist[a, p]
            neg = [dist[a, n] for n in range(5) if labels[n] != labels[a]]
            outside = [d for d in neg if d > d_ap]
            d_an = min(outside) if outside else max(neg)
            expected.append(max(d_ap - d_an + 0.3, 0))
    assert loss == pytest.approx(np.mean(expected), abs=1e-5)


def test_verifier_threshold_is_where_the_probability_crosses_one_half():
    rng = np.random.default_rng(0)
    same = np.r_[np.ones(500, bool), np.zeros(500, bool)]
    distance = np.where(same, rng.normal(0.6, 0.15, 1000), rng.normal(1.2, 0.15, 1000))
    verifier = PairVerifier.fit(distance, same)
    assert verifier.threshold == pytest.approx(0.9, abs=0.03)  # midway between equal spreads
    assert verifier.predict_proba([verifier.threshold])[0] == pytest.approx(0.5)
    assert verifier.roc_auc > 0.99
    proba = verifier.predict_proba([0.3, 0.6, 1.2, 1.5])
    assert np.all(np.diff(proba) < 0) and proba[0] > 0.95 and proba[-1] < 0.05
    assert PairVerifier.from_dict(json.loads(json.dumps(verifier.to_dict()))) == verifier


def test_verify_pairs_by_id_and_from_csv(fitted, tmp_path):
    store, _, result, (X, y) = fitted
    saved = json.loads(table_verifier(store.table_dir(result.lineage)).read_text())
    assert saved["split"] == "val" and saved["roc_auc"] > 0.9
    ids = _ids(0, N_IMAGES)
    zeros = [ids[i] for i in np.flatnonzero(y[:N_IMAGES] == 0)[:2]]
    one = ids[int(np.flatnonzero(y[:N_IMAGES] == 1)[0])]
    frame = run_verify(VerifyConfig(store=store.root, embedding=result.lineage.name,
                                    pairs=[(zeros[0][:10], zeros[1]), (zeros[0], one)]))
    assert frame["same"].tolist() == [True, False]
    assert frame["probability"][0] > 0.5 > frame["probability"][1]
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"a,b\n{zeros[0]},{zeros[1]}\n{zeros[0]},{one}\n")
    runner = CliRunner()
    out = runner.invoke(main, ["verify", "--store", str(store.root), "--embedding",
                               result.lineage.name, "--pairs", str(pairs)])
    assert out.exit_code == 0, out.output
    assert out.output.count("True") == 1 and out.output.count("False") == 1
    bad = runner.invoke(main, ["verify", zeros[0], "--store", str(store.root),
                               "--embedding", result.lineage.name])
    assert bad.exit_code == 2 and "Give two images A B" in bad.output


def test_fit_embedding_refuses_a_class_with_one_image(tmp_path):
    store = Store(tmp_path / "store")
    X = load_digits().data[:12].astype(np.float32)
    with store.writer(make_lineage(pool="max")) as w:  # class "9": one image, three views
        w.append(X, image_id=_ids(0, 12), label=["0"] * 6 + ["1"] * 5 + ["9"],
                 split=["train"] * 12)
        w.append(X[-1:].repeat(3, 0), image_id=_ids(11, 12) * 3, aug_id=[1, 2, 3],
                 label=["9"] * 3, split=["train"] * 3)
    out = CliRunner().invoke(main, ["fit-embedding", "--store", str(store.root), "--table",
                                    "densenet121/max", "--epochs", "1"])
    assert out.exit_code == 2
    assert out.output.startswith("Error: 1 class(es) have fewer than 2 images") and \
        "'9' (1)" in out.output and "Traceback" not in out.output


def test_extend_derived_projects_only_new_parent_rows_and_rerun_resumes(fitted):
    store, parent, result, (X, y) = fitted
    before = store.open(result.lineage).read_features()
    with store.writer(parent, formats=("hdf5", "parquet")) as w:
        _append(w, X, y, N_IMAGES, N_IMAGES + 50)
    added = extend_derived(store, result.lineage.key, echo=lambda _: None)
    reader = store.open(result.lineage)
    assert added == len(store.open(parent)) - len(before) > 50
    np.testing.assert_array_equal(reader.read_features(np.arange(len(before))), before)
    assert set(reader.keys()) == set(store.open(parent).keys())
    again = run_fit_embedding(FitEmbeddingConfig(store=store.root, table="densenet121/avg",
                                                 **FIT), echo=lambda _: None)
    assert again.resumed and again.rows_added == 0 and again.lineage == result.lineage


def test_derived_lineage_keeps_image_tables_as_they_were_and_parses_its_name():
    from featurestore.lineage import Lineage, derived_spec, parse_query

    parent = make_lineage(pool="avg", augmentation={"preset": "mild", "views": 1, "seed": 0})
    child = derived_spec(parent, {"dim": 128, "loss": "triplet"}, "ab" * 32)
    assert "derived" not in parent.to_dict() and "derived" not in parent.to_json()
    assert child.key.startswith("densenet121-avg-32-emb128-") and child.key != parent.key
    assert child.name == "densenet121/avg/32+mild+emb128"
    assert parse_query(child.name) == {"backbone": "densenet121", "pool": "avg",
                                       "input_size": "32", "augmentation": "mild",
                                       "embedding": "emb128"}
    assert child.matches(parse_query(child.name)) and not parent.matches(parse_query(child.name))
    assert not child.matches(parse_query(parent.name))  # the parent's name stays the parent's
    assert Lineage.from_json(child.to_json()) == child and set(parent.diff(child)) == {"derived"}
    with pytest.raises(FeatureStoreError, match="itself derived"):
        derived_spec(child, {"dim": 8}, "cd" * 32)
    with pytest.raises(FeatureStoreError, match="'derived' must hold"):
        Lineage(**{**parent.to_dict(), "derived": {"parent_key": parent.key}})
