"""Conformance suite over every registered head.

scikit-learn's own estimator checks (``parametrize_with_checks``) run on each
head with its small, fast ``test_params``; checks a head fails on purpose are
listed with a reason in its registry entry. Our checks follow: the search space
is a plain function of a trial, its parameters build a head that learns real
multiclass and binary digits, class weights move decisions, groups are accepted.
"""

import numpy as np
import optuna
import pytest
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.utils.estimator_checks import parametrize_with_checks

from classifiers import UnknownHeadError, create_head, get_head_spec, list_heads

HEADS = list_heads()


def fast_head(name, **params):
    return create_head(name, **{**get_head_spec(name).test_params, **params})


def expected_failures(estimator):
    return dict(get_head_spec(estimator.head_name).expected_failed_checks)


@parametrize_with_checks([fast_head(name) for name in HEADS],
                         expected_failed_checks=expected_failures)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X.astype(np.float32), y


class MidpointTrial(optuna.trial.FixedTrial):
    """A FixedTrial answering every suggestion with a value inside its range."""

    def __init__(self):
        super().__init__({})

    def suggest_float(self, name, low, high, *, step=None, log=False):
        return float(np.sqrt(low * high)) if log else (low + high) / 2

    def suggest_int(self, name, low, high, *, step=1, log=False):
        return int(round((low + high) / 2))

    def suggest_categorical(self, name, choices):
        return choices[len(choices) // 2]


def test_unknown_head_lists_known_names():
    with pytest.raises(UnknownHeadError, match="Unknown head 'xgb'. Available: keras_dense, knn"):
        create_head("xgb")


@pytest.mark.parametrize("name", HEADS)
def test_search_space_params_build_a_learning_head(name, digits):
    X, y = digits
    params = get_head_spec(name).search_space(MidpointTrial())
    assert params and set(params) <= set(create_head(name).get_params())
    head = fast_head(name, **params)
    if name == "keras_dense":
        head.set_params(max_epochs=15)
    head.fit(X[:1000], y[:1000])
    proba = head.predict_proba(X[1000:])
    assert proba.shape == (len(X) - 1000, 10)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    assert head.score(X[1000:], y[1000:]) > 0.75, name


@pytest.mark.parametrize("name", HEADS)
def test_binary_groups_and_class_weight(name, digits):
    X, y = digits
    keep = np.isin(y, (3, 8))
    X, y = X[keep], np.where(y[keep] == 8, "eight", "three")
    groups = np.arange(len(y)) // 2
    plain = fast_head(name).fit(X, y, groups=groups)
    assert list(plain.classes_) == ["eight", "three"]
    weighted = clone(plain).set_params(class_weight={"eight": 50.0}).fit(X, y, groups=groups)
    # A heavy weight on "eight" can only raise its predicted probability on average.
    assert weighted.predict_proba(X)[:, 0].mean() > plain.predict_proba(X)[:, 0].mean() - 1e-9
    with pytest.raises(ValueError, match="class_weight names classes"):
        clone(plain).set_params(class_weight={"nine": 2}).fit(X, y)
