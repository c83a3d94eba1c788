"""fit-heads with two local worker processes on the store's own SQLite storage.

Several heads and the ensemble at once: every study ends with exactly
``n_trials`` trials, numbered once each and drawn once each, both workers run
trials, and each head (the ensemble too) is refit and saved by exactly one of
them, so models and leaderboard rows never clash. Successive halving prunes
on folds.
"""

from collections import Counter

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from classifiers.errors import ClassifierError
from classifiers.studies import WORKER
from classifiers.tuning import tune_head
from featurestore import Store
from pipelines.heads.fit import FitHeadsConfig, run_fit_heads
from pipelines.heads.models import load_model
from tests.test_fit_heads import digits_problem, write_digits_table

HEADS = ["logreg", "knn", "ensemble"]


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    root = tmp_path_factory.mktemp("workers") / "store"
    lin = write_digits_table(root, classes=(3, 5, 8), n_per_class=30)
    config = FitHeadsConfig(store=root, table=lin.key, heads=HEADS, n_trials=4, cv=2,
                            workers=2)
    return root, lin, run_fit_heads(config, echo=lambda line: None)


def test_each_study_has_n_trials_numbered_and_drawn_once(two_workers):
    root, _, _ = two_workers
    url = Store(root).paths.optuna_url
    studies = {s.study_name.split("/")[-3]: s.study_name
               for s in optuna.get_all_study_summaries(url)}
    assert sorted(studies) == sorted(HEADS)  # the ensemble's is empty: it only holds the claim
    workers = Counter()
    for head in ("logreg", "knn"):
        trials = optuna.load_study(study_name=studies[head], storage=url).get_trials()
        assert sorted(t.number for t in trials) == list(range(4))
        assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
        assert len({tuple(sorted(t.params.items())) for t in trials}) == 4
        workers.update(t.user_attrs[WORKER] for t in trials)
    assert len(workers) == 2, workers  # both workers ran trials


def test_each_head_is_refit_and_saved_by_one_worker(two_workers):
    root, lin, result = two_workers
    assert sorted(result.heads) == sorted(HEADS)  # merged: each head from the worker that saved it
    models = Store(root).paths.models_of(lin.key)
    assert sorted(p.name for p in models.iterdir() if not p.name.startswith(".")) == sorted(HEADS)
    assert sorted(result.leaderboard["head"]) == sorted(HEADS)
    # The ensemble saw both members, including the one the other worker refit.
    ensemble = load_model(root, lin.key, "ensemble")
    assert sorted(ensemble.estimator.member_params) == ["knn", "logreg"]
    assert sum(ensemble.estimator.weights_) == pytest.approx(1.0)


def test_halving_prunes_on_folds_and_an_unknown_pruner_is_named():
    X, y, groups, folds, objective = digits_problem(n=150)
    storage = optuna.storages.InMemoryStorage()
    result = tune_head("logreg", X, y, groups, folds, objective=objective, n_trials=9,
                       fixed_params={"max_iter": 15}, storage=storage, study_name="halving")
    assert result.n_pruned > 0 and result.n_complete + result.n_pruned == 9
    trials = optuna.load_study(study_name="halving", storage=storage).get_trials()
    # Rungs after 1 fold and after 3, the last, whose result is kept: pruned after 1.
    assert {len(t.intermediate_values) for t in trials if t.state == TrialState.PRUNED} == {1}
    assert all(sorted(t.intermediate_values) == [1, 2, 3] for t in trials
               if t.state == TrialState.COMPLETE)
    with pytest.raises(ClassifierError, match="Unknown pruner 'hyper'. Available: halving"):
        tune_head("logreg", X, y, groups, folds, objective=objective, pruner="hyper")
    assert np.isfinite(result.value)
