"""Conformance suite over every registered head.

scikit-learn's own estimator checks (``parametrize_with_checks``) run on each
head with its small, fast ``test_params``; checks a head fails on purpose are
listed with a reason in its registry entry. Our checks follow: the search space
is a plain function of a trial, its parameters build a head that learns real
multiclass and binary digits, class weights move decisions, groups are accepted,
and every head saves and loads through its own files with identical probabilities.
"""

import numpy as np
import optuna
import pytest
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.exceptions import NotFittedError
from sklearn.utils.estimator_checks import parametrize_with_checks

from classifiers import (ClassifierError, UnknownHeadError, create_head, get_head_spec,
                         list_heads)

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
    with pytest.raises(UnknownHeadError,
                       match="Unknown head 'xgb'. Available: ensemble, keras_dense, knn"):
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


@pytest.mark.parametrize("name", HEADS)
def test_save_load_round_trip_gives_identical_probabilities(name, digits, tmp_path):
    X, y = digits
    labels = np.array(["zero", "one", "two"])[y % 3]
    head = fast_head(name).fit(X[:600], labels[:600])
    files = head.save(tmp_path)
    assert files and sorted(files) == sorted(p.name for p in tmp_path.iterdir())
    assert not any(f.endswith((".joblib", ".pkl", ".pickle")) for f in files)
    params = get_head_spec(name).cls().get_params() | get_head_spec(name).test_params
    loaded = type(head).load(tmp_path, files, head.fitted_state(), params)
    assert type(loaded) is type(head) and list(loaded.classes_) == list(head.classes_)
    np.testing.assert_array_equal(loaded.predict_proba(X[600:]), head.predict_proba(X[600:]))
    head.clear()
    with pytest.raises(NotFittedError):
        head.predict_proba(X[:2])


def test_skops_head_refuses_a_file_of_another_type_naming_it(digits, tmp_path):
    X, y = digits
    svm = fast_head("svm").fit(X[:300], y[:300])
    files = svm.save(tmp_path)
    LogReg = get_head_spec("logreg").cls
    with pytest.raises(ClassifierError, match="LinearSVMHead.*does not trust"):
        LogReg.load(tmp_path, files, svm.fitted_state(), {})
