"""The ``ensemble`` head: greedy selection's weights, and fit-heads selecting it over the
heads it tuned in the same run (its own leaderboard row, saved weights, safe reload).
The scikit-learn and save/load conformance checks run on it in tests/test_heads.py."""

import json
from collections import Counter

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.metrics import log_loss

from classifiers.heads.ensemble import greedy_selection
from classifiers.heads.knn import KNNHead
from classifiers.heads.logreg import LogRegHead
from featurestore import Lineage, Store
from pipelines.heads.fit import FitHeadsConfig, run_fit_heads
from pipelines.heads.models import load_model

QUIET = {"echo": lambda s: None}


def test_greedy_selection_weights_sum_to_one_and_beat_the_best_member():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    truth = np.eye(3)[y]
    # Two members right on different halves, one that knows nothing.
    left = np.where(np.arange(300)[:, None] < 150, 0.8 * truth + 0.2 / 3, 1 / 3)
    right = np.where(np.arange(300)[:, None] >= 150, 0.8 * truth + 0.2 / 3, 1 / 3)
    useless = np.full((300, 3), 1 / 3)
    weights = greedy_selection([left, right, useless], y, n_iter=20)
    assert weights.shape == (3,) and weights.min() >= 0
    assert weights.sum() == pytest.approx(1.0)
    assert weights[2] == 0 and weights[0] > 0 and weights[1] > 0
    mixed = sum(w * p for w, p in zip(weights, [left, right, useless]))
    assert log_loss(y, mixed) < min(log_loss(y, p, labels=[0, 1, 2]) for p in (left, right))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    X, y = load_digits(return_X_y=True)
    keep = np.isin(y, (3, 5, 8, 9))
    X = X[keep] + np.random.default_rng(0).normal(0, 4, X[keep].shape)
    y = y[keep].astype(str)
    split = np.where(np.random.default_rng(1).random(len(y)) < 0.75, "train", "test")
    root = tmp_path_factory.mktemp("ensemble") / "store"
    lineage = Lineage(backbone="digits", weights="none", pool="max", input_size=8,
                      preprocessing="none")
    with Store(root).writer(lineage, formats=("hdf5",)) as w:
        w.append(X.astype(np.float32), image_id=[f"{i:064x}" for i in range(len(y))],
                 label=y, split=split)
    fits = Counter()
    with pytest.MonkeyPatch.context() as patch:
        for cls in (LogRegHead, KNNHead):  # the real fits, counted
            patch.setattr(cls, "fit", _counted(cls.fit, fits, cls.head_name))
        result = run_fit_heads(FitHeadsConfig(store=root, table="digits/max", search="none",
                                              cv=3, heads=["ensemble", "logreg", "knn"]),
                               **QUIET)
    return root, result, X[split == "test"].astype(np.float32), fits


def _counted(fit, fits: Counter, name: str):
    def counted_fit(self, *args, **kwargs):
        fits[name] += 1
        return fit(self, *args, **kwargs)
    return counted_fit


def test_fit_heads_selects_the_ensemble_over_the_heads_it_tuned(fitted):
    root, result, X_test, fits = fitted
    # 3 folds and 1 refit per member: the ensemble reuses the members' refits.
    assert fits == {"logreg": 4, "knn": 4}
    assert list(result.heads) == ["logreg", "knn", "ensemble"]  # members first
    ensemble = result.heads["ensemble"]
    params = ensemble.search.params
    assert sorted(params["member_params"]) == ["knn", "logreg"]
    assert sum(params["weights"]) == pytest.approx(1.0)
    board = result.leaderboard.set_index("head")
    assert {"logreg", "knn", "ensemble"} <= set(board.index)
    assert board.loc["ensemble", "accuracy"] == pytest.approx(ensemble.metrics["accuracy"])
    record = json.loads((ensemble.model_dir / "model.json").read_text())
    assert sum(record["fitted_state"]["weights_"]) == pytest.approx(1.0)
    model = load_model(root, "digits/max", "ensemble")
    proba = model.estimator.predict_proba(X_test)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert (model.estimator.predict(X_test) == model.estimator.classes_[proba.argmax(1)]).all()
