"""Grouped folds, out-of-fold predictions and metrics, on scikit-learn's digits."""

import numpy as np
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.datasets import load_digits
from sklearn.model_selection import StratifiedKFold

from classifiers.cv import Fold, LeakageError, check_folds, cross_val_proba, grouped_folds
from classifiers.metrics import (decide, evaluation_report, make_objective,
                                 recall_floor_threshold, score)


def augmented_digits(n_views=3, seed=0):
    """Digits plus ``n_views`` noisy copies of each image sharing its group."""
    X, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    n = len(y)
    groups = np.array([f"img{i:04d}" for i in range(n)])
    Xs, ys, gs, raw = [X], [y], [groups], [np.ones(n, bool)]
    for _ in range(n_views):
        Xs.append(X + rng.normal(0, 0.5, X.shape))
        ys.append(y), gs.append(groups), raw.append(np.zeros(n, bool))
    return (np.concatenate(Xs).astype(np.float32), np.concatenate(ys), np.concatenate(gs),
            np.concatenate(raw))


class SpyHead(ClassifierMixin, BaseEstimator):
    """Records the groups it was trained on; predicts the class prior."""

    seen = []

    def fit(self, X, y, groups=None):
        SpyHead.seen.append(set(groups))
        self.classes_ = np.unique(y)
        self.prior_ = np.unique(y, return_counts=True)[1] / len(y)
        return self

    def predict_proba(self, X):
        return np.tile(self.prior_, (len(X), 1))


def test_views_of_an_image_never_straddle_a_fold():
    X, y, groups, raw = augmented_digits()
    folds = grouped_folds(y, groups, raw, n_splits=5, seed=0)
    scored = np.concatenate([f.test for f in folds])
    assert sorted(scored) == sorted(np.flatnonzero(raw))  # every raw row once, views never
    views = np.concatenate([f.views for f in folds])
    assert sorted(views) == sorted(np.flatnonzero(~raw))  # each view scored once, for TTA
    for fold in folds:
        assert not set(groups[fold.train]) & set(groups[fold.test])
        assert set(groups[fold.views]) <= set(groups[fold.test])
        assert raw[fold.test].all()
        assert (~raw[fold.train]).sum() == 3 * raw[fold.train].sum()  # views train
    # Stratified: each fold's class mix is close to the whole.
    for fold in folds:
        assert np.abs(np.bincount(y[fold.test], minlength=10) / len(fold.test) - 0.1).max() < 0.03


def test_the_straddle_check_catches_folds_that_ignore_groups():
    X, y, groups, raw = augmented_digits(n_views=1)
    naive = [Fold(tr, te) for tr, te in StratifiedKFold(5).split(X, y)]
    with pytest.raises(LeakageError, match="on both sides"):
        check_folds(naive, groups, np.ones(len(y), bool))
    # Grouping by row instead of by image: the folds look fine row-wise but leak.
    by_row = grouped_folds(y, np.arange(len(y)), np.ones(len(y), bool), n_splits=5)
    with pytest.raises(LeakageError):
        check_folds(by_row, groups, np.ones(len(y), bool))


def test_cross_val_proba_trains_on_other_images_and_scores_their_views_with_them():
    X, y, groups, raw = augmented_digits(n_views=2)
    folds = grouped_folds(y, groups, raw, n_splits=4, seed=1)
    SpyHead.seen = []
    oof = cross_val_proba(SpyHead, X, y, groups, folds, np.arange(10))
    assert not np.isnan(oof).any()
    for seen, fold in zip(SpyHead.seen, folds):
        assert seen.isdisjoint(groups[fold.test])
        # The model of the fold that tested an image scored its views (SpyHead: one prior).
        np.testing.assert_array_equal(oof[fold.views], np.tile(oof[fold.test[0]],
                                                               (len(fold.views), 1)))


def test_cv_larger_than_the_images_is_refused():
    y = np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match="cv must be between 2 and the number of raw"):
        grouped_folds(y, np.arange(4), np.ones(4, bool), n_splits=5)


def test_recall_floor_threshold_on_a_constructed_case():
    #            positives ............  negatives ...................
    score_ = np.array([0.9, 0.8, 0.7, 0.3, 0.85, 0.6, 0.5, 0.2, 0.1])
    positive = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0], bool)
    choice = recall_floor_threshold(positive, score_, 0.75)
    # Recall 3/4 needs the threshold at 0.7; only the negative at 0.85 passes it.
    assert (choice.threshold, choice.recall, choice.specificity) == (0.7, 0.75, 0.8)
    choice = recall_floor_threshold(positive, score_, 1.0)
    assert (choice.threshold, choice.recall, choice.specificity) == (0.3, 1.0, 0.4)
    # Recall 0.5: thresholds 0.8 and 0.7 both let one negative through; the
    # tie goes to the higher recall.
    choice = recall_floor_threshold(positive, score_, 0.5)
    assert (choice.threshold, choice.recall, choice.specificity) == (0.7, 0.75, 0.8)
    # The objective and the decision rule agree with the choice.
    proba = np.column_stack([1 - score_, score_])
    obj = make_objective("recall_floor", ["neg", "pos"], min_recall=0.75)
    assert score(obj, positive.astype(int), proba) == 0.8
    pred = decide(proba, 0.7, positive=1)
    assert pred.tolist() == [1, 1, 1, 0, 1, 0, 0, 0, 0]


def test_objective_arguments_are_checked():
    with pytest.raises(ValueError, match="Unknown metric 'auc'. Allowed: accuracy"):
        make_objective("auc", ["a", "b"])
    with pytest.raises(ValueError, match="needs min_recall"):
        make_objective("recall_floor", ["a", "b"])
    with pytest.raises(ValueError, match="positive_class 'c' is not a label"):
        make_objective(None, ["a", "b"], positive_class="c", min_recall=0.9)
    with pytest.raises(ValueError, match="needs positive_class with 3 classes"):
        make_objective(None, ["a", "b", "c"], min_recall=0.9)
    obj = make_objective(None, ["a", "b", "c"], positive_class="b", min_recall=0.9)
    assert (obj.name, obj.positive, obj.label) == ("recall_floor", 1, "recall_floor@0.9")


def test_multiclass_report_and_positive_class_threshold():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 20)
    proba = rng.dirichlet(np.ones(3), size=60)
    proba[np.arange(60), y] += 1.0
    proba /= proba.sum(axis=1, keepdims=True)
    report = evaluation_report(y, proba, ["a", "b", "c"], threshold=0.0, positive=1)
    assert report["recall"] == 1.0  # threshold 0: every row is called "b"
    assert np.array(report["confusion_matrix"])[:, 1].sum() == 60
    plain = evaluation_report(y, proba, ["a", "b", "c"])
    assert plain["accuracy"] == 1.0 and plain["report"]["b"]["support"] == 20
    assert 0.99 < plain["roc_auc"] <= 1.0


def test_heads_inner_hold_out_keeps_views_of_an_image_together():
    from classifiers.heads.base import inner_split

    X, y, groups, raw = augmented_digits(n_views=2)
    train, val = inner_split(y, groups, 0.15, seed=0)
    assert not set(groups[train]) & set(groups[val])
    assert len(train) + len(val) == len(y) and 0.1 < len(val) / len(y) < 0.2
    assert inner_split(y[:30], groups[:30], 0.15, seed=0) is None  # too small to hold out
