"""The label audit on look-alike classes (digits 3/5/8/9, noisy pixels): it must beat the
plain ranking a user could write in three lines, and its out-of-fold recalibration must
keep probabilities valid while making them better."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from classifiers.calibration import CALIBRATIONS, calibrate_out_of_fold
from classifiers.errors import ClassifierError
from classifiers.label_issues import neighbour_vote
from classifiers.registry import create_head
from featurestore import Lineage, Store
from pipelines.audit.run import AuditLabelsConfig, run_audit_labels
from pipelines.audit.scores import load_scores
from pipelines.heads.fit import FitHeadsConfig, run_fit_heads

QUIET = {"echo": lambda s: None}
LOOKALIKE = (3, 5, 8, 9)


def lookalike_digits(sigma=6.0, seed=0):
    """``(X (n, 64) noisy pixels, y (n,) class index)`` of the confusable digits."""
    X, y = load_digits(return_X_y=True)
    keep = np.isin(y, LOOKALIKE)
    noisy = X[keep] + np.random.default_rng(seed).normal(0, sigma, X[keep].shape)
    return noisy.astype(np.float32), np.searchsorted(LOOKALIKE, y[keep])


def flip(y, rate, rng):
    chosen = rng.choice(len(y), size=int(round(rate * len(y))), replace=False)
    noisy = y.copy()
    for i in chosen:
        noisy[i] = rng.choice([c for c in range(len(LOOKALIKE)) if c != y[i]])
    return noisy, chosen


def fold_index(y, n_splits=5, seed=0):
    fold = np.empty(len(y), dtype=np.int64)
    for k, (_, rows) in enumerate(StratifiedKFold(n_splits, shuffle=True, random_state=seed)
                                  .split(y, y)):
        fold[rows] = k
    return fold


@pytest.fixture(scope="module")
def lookalike_store(tmp_path_factory):
    """A store of look-alike digits, 10% of the train labels flipped, logreg fitted on them."""
    X, y = lookalike_digits()
    rng = np.random.default_rng(1)
    split = np.where(rng.random(len(y)) < 0.8, "train", "test")
    train = np.flatnonzero(split == "train")
    given = y.copy()
    given[train], chosen = flip(y[train], 0.10, rng)
    ids = np.array([f"{i:064x}" for i in range(len(y))])
    root = tmp_path_factory.mktemp("lookalike") / "store"
    lineage = Lineage(backbone="digits", weights="none", pool="max", input_size=8,
                      preprocessing="none")
    labels = np.asarray(LOOKALIKE)[given].astype(str)
    with Store(root).writer(lineage, formats=("hdf5",)) as w:
        w.append(X, image_id=ids, label=labels, split=split)
    run_fit_heads(FitHeadsConfig(store=root, table="digits/max", heads=["logreg"],
                                 search="none", cv=5), **QUIET)
    return root, X[train], labels[train], set(ids[train][chosen])


def top_k_precision(root, flipped, **options):
    audit = run_audit_labels(AuditLabelsConfig(store=root, table="digits/max", neighbours=0,
                                               **options), **QUIET)
    top = audit.ranking.head(len(flipped))
    return float(top["image_id"].isin(flipped).mean()), audit


def test_audit_beats_the_plain_ranking_on_lookalike_classes(lookalike_store):
    root, X, labels, flipped = lookalike_store
    _, y = np.unique(labels, return_inverse=True)
    proba = cross_val_predict(LogisticRegression(max_iter=1000), X, y, method="predict_proba",
                              cv=StratifiedKFold(5, shuffle=True, random_state=0))
    plain = _plain_precision(root, proba, y, flipped)
    ours, audit = top_k_precision(root, flipped)
    before, _ = top_k_precision(root, flipped, calibration="none", neighbour_vote=False)
    assert audit.heads == ["logreg", "neighbours"]
    weights = json.loads((audit.run_dir / "run.json").read_text())["weights"]
    assert set(weights) == {"logreg", "neighbours"} and sum(weights.values()) == pytest.approx(1)
    assert ours >= plain + 0.05, (ours, plain)
    assert ours > before, (ours, before)  # the recalibrated ensemble is what earns it


def _plain_precision(root, proba, y, flipped):
    """Top-K precision of ranking the train images by the plain model's given-label probability."""
    with Store(root).open("digits/max") as reader:
        ids = reader.metadata().query("split == 'train'")["image_id"].to_numpy()
    top = ids[np.argsort(proba[np.arange(len(y)), y], kind="stable")[:len(flipped)]]
    return float(np.isin(top, list(flipped)).mean())


@pytest.fixture(scope="module")
def overconfident():
    """Out-of-fold probabilities of a barely regularised logreg on noisy pixels, with folds."""
    X, y = lookalike_digits()
    fold = fold_index(y)
    proba = cross_val_predict(create_head("logreg", C=100.0, max_iter=60), X, y,
                              method="predict_proba",
                              cv=[(np.flatnonzero(fold != k), np.flatnonzero(fold == k))
                                  for k in range(5)])
    return y, proba, fold


@pytest.mark.parametrize("method", ["temperature", "isotonic"])
def test_calibration_keeps_rows_summing_to_one_and_lowers_out_of_fold_log_loss(
        method, overconfident):
    y, proba, fold = overconfident
    calibrated = calibrate_out_of_fold(y, proba, fold, method=method)
    assert calibrated.shape == proba.shape
    np.testing.assert_allclose(calibrated.sum(axis=1), 1.0, atol=1e-9)
    assert np.all(calibrated >= 0)
    assert log_loss(y, calibrated) < 0.9 * log_loss(y, proba)
    assert np.array_equal(calibrate_out_of_fold(y, proba, fold, method="none"), proba)


def test_calibration_and_vote_refuse_what_they_cannot_do():
    y = np.array([0, 1, 0, 1])
    with pytest.raises(ClassifierError, match="Available: " + ", ".join(CALIBRATIONS)):
        calibrate_out_of_fold(y, np.full((4, 2), 0.5), method="platt")
    with pytest.raises(ClassifierError, match="fewer than two classes"):
        neighbour_vote(np.zeros((4, 3)), np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1]), 2)


def test_the_audit_averages_each_image_over_its_views_scored_by_the_same_fold(tmp_path):
    """Test-time augmentation: fit-heads scores each train image's views with the fold model
    that scored the image (and trained on none of them); the audit averages them."""
    X, y = lookalike_digits()
    X, y = X[:240], y[:240]
    ids = np.array([f"{i:064x}" for i in range(len(y))])
    labels = np.asarray(LOOKALIKE)[y].astype(str)
    views = X.repeat(2, axis=0) + np.random.default_rng(2).normal(0, 2, (2 * len(y), 64))
    lineage = Lineage(backbone="digits", weights="none", pool="max", input_size=8,
                      preprocessing="none")
    with Store(tmp_path).writer(lineage, formats=("hdf5",)) as w:
        w.append(X, image_id=ids, label=labels, split=np.full(len(y), "train"))
        w.append(views.astype(np.float32), image_id=ids.repeat(2), aug_id=np.tile([1, 2], len(y)),
                 label=labels.repeat(2), split=np.full(2 * len(y), "train"))
    fitted = run_fit_heads(FitHeadsConfig(store=tmp_path, table="digits/max", heads=["logreg"],
                                          search="none", cv=4), **QUIET)
    folder = fitted.heads["logreg"].model_dir
    oof = pd.read_parquet(folder / "oof.parquet").set_index("image_id")
    scored_views = pd.read_parquet(folder / "oof-views.parquet")
    assert sorted(scored_views.groupby("image_id")["aug_id"].apply(sorted).explode().unique()) \
        == [1, 2] and len(scored_views) == 2 * len(y)
    np.testing.assert_array_equal(scored_views["fold"], oof.loc[scored_views["image_id"], "fold"])
    columns = [c for c in oof if c.startswith("proba_")]
    by_image = pd.concat([oof[columns].reset_index(), scored_views[["image_id", *columns]]])
    mean = by_image.groupby("image_id")[columns].mean().sort_index().to_numpy()
    store = Store(tmp_path)
    tta = load_scores(store, fitted.table_key, ["logreg"], calibration="none", tta=True)
    raw = load_scores(store, fitted.table_key, ["logreg"], calibration="none")
    np.testing.assert_allclose(tta.members[0], mean)
    np.testing.assert_allclose(raw.members[0], oof[columns].sort_index().to_numpy())
    assert not np.allclose(tta.members[0], raw.members[0])
