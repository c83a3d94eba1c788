"""fit-heads end to end on tiny digits tables: search resume, failed trials,
models with lineage, out-of-fold files, the leaderboard and the CLI."""

import dataclasses
import json

import numpy as np
import optuna
import pandas as pd
import pytest
from click.testing import CliRunner
from sklearn.datasets import load_digits

from classifiers import create_head, get_head_spec, list_heads, registry
from classifiers.cv import grouped_folds
from classifiers.metrics import make_objective
from classifiers.tuning import tune_head
from featurestore import FeatureStoreError, Lineage, LineageMismatchError, Store
from pipelines.heads import fit as fit_heads
from pipelines.heads.fit import FitHeadsConfig, parse_class_weight, run_fit_heads
from pipelines.heads.models import load_model, save_model


def lineage(pool="max"):
    return Lineage(backbone="digits", weights="random:0", pool=pool, input_size=8,
                   preprocessing="none", augmentation={"preset": "noise", "views": 1})


def write_digits_table(root, *, classes=(3, 8), pool="max", n_per_class=60, views=1):
    """A tiny table: raw digits in train/test plus ``views`` noisy copies of train rows."""
    X, y = load_digits(return_X_y=True)
    keep = np.concatenate([np.flatnonzero(y == c)[:n_per_class] for c in classes])
    X, y = X[keep].astype(np.float32), y[keep]
    rng = np.random.default_rng(0)
    split = np.where(rng.random(len(y)) < 0.7, "train", "test")
    ids = [f"{i:064x}" for i in keep]
    lin = lineage(pool)
    with Store(root).writer(lin, formats=("hdf5",)) as w:
        w.append(X, image_id=ids, label=[f"d{v}" for v in y], split=list(split))
        train = np.flatnonzero(split == "train")
        for view in range(1, views + 1):
            w.append(X[train] + rng.normal(0, 1.0, X[train].shape).astype(np.float32),
                     image_id=[ids[i] for i in train], aug_id=[view] * len(train),
                     label=[f"d{v}" for v in y[train]], split=["train"] * len(train))
    return lin


@pytest.fixture
def store_root(tmp_path):
    return tmp_path / "store"


def digits_problem(n=300):
    X, y = load_digits(return_X_y=True)
    X, y = X[:n].astype(np.float32), y[:n]
    groups = np.arange(n)
    folds = grouped_folds(y, groups, np.ones(n, bool), n_splits=3)
    return X, y, groups, folds, make_objective("accuracy", np.unique(y))


def test_search_resumes_without_redoing_finished_trials(tmp_path):
    X, y, groups, folds, objective = digits_problem()
    url = f"sqlite:///{tmp_path / 'optuna.sqlite'}"
    kwargs = dict(objective=objective, storage=url, study_name="resume")
    first = tune_head("logreg", X, y, groups, folds, n_trials=3, **kwargs)
    assert first.n_complete == 3 and len(first.trial_seconds) == 3
    study = optuna.load_study(study_name="resume", storage=url)
    before = [(t.number, t.params, t.datetime_complete) for t in study.trials]
    second = tune_head("logreg", X, y, groups, folds, n_trials=5, **kwargs)
    assert len(second.trial_seconds) == 2  # only the two missing trials ran
    trials = optuna.load_study(study_name="resume", storage=url).trials
    assert len(trials) == 5
    assert [(t.number, t.params, t.datetime_complete) for t in trials[:3]] == before
    # The resumed run does not replay the first run's suggestions.
    assert trials[3].params != trials[0].params
    third = tune_head("logreg", X, y, groups, folds, n_trials=5, **kwargs)
    assert third.trial_seconds == [] and third.params == second.params
    assert np.allclose(third.oof, second.oof)  # recomputed from the stored best params


def test_a_failing_trial_is_recorded_and_the_search_goes_on(monkeypatch):
    X, y, groups, folds, objective = digits_problem()

    def space(trial):
        # Trial 1 asks for a negative C, which LogisticRegression refuses.
        return {"C": -1.0 if trial.number == 1 else trial.suggest_float("C", 0.01, 1, log=True)}

    spec = dataclasses.replace(get_head_spec("logreg"), search_space=space)
    monkeypatch.setitem(registry._REGISTRY, "logreg", spec)
    result = tune_head("logreg", X, y, groups, folds, n_trials=4, objective=objective)
    # The failed trial does not count: four trials still give a result.
    assert (result.n_complete + result.n_pruned, result.n_failed) == (4, 1)
    assert "C" in result.fail_reasons[0] and result.params["C"] > 0


def test_run_fit_heads_binary_with_recall_floor(store_root):
    lin = write_digits_table(store_root)
    result = run_fit_heads(FitHeadsConfig(
        store=store_root, table="digits/max", heads=["logreg", "knn"], n_trials=3, cv=3,
        positive_class="d8", min_recall=0.95, class_weight="d8:2"), echo=lambda s: None)
    assert result.objective.label == "recall_floor@0.95" and result.eval_split == "test"
    with Store(store_root).open(lin) as reader:
        _, y_train, ids, _ = reader.to_numpy(split="train", aug="raw")
        _, y_test, _, _ = reader.to_numpy(split="test")
    for head in ("logreg", "knn"):
        outcome = result.heads[head]
        assert outcome.threshold is not None
        assert outcome.metrics["report"]["d8"]["support"] == (y_test == "d8").sum()
        oof = pd.read_parquet(outcome.model_dir / "oof.parquet")
        # One out-of-fold row per raw train image, none for augmented views.
        assert sorted(oof.image_id) == sorted(ids["image_id"])
        assert np.allclose(oof[["proba_d3", "proba_d8"]].sum(axis=1), 1.0)
        assert sorted(oof.fold.unique()) == [0, 1, 2]
        meta = json.loads((outcome.model_dir / "model.json").read_text())
        assert meta["lineage"] == lin.to_dict() and meta["params"]["class_weight"] == {"d8": 2.0}
        assert meta["threshold"] == outcome.threshold and "scikit-learn" in meta["library_versions"]
        model = load_model(store_root, lin.key, head)
        X_test = Store(store_root).open(lin).to_numpy(split="test")[0]
        assert set(model.predict(X_test)) <= {"d3", "d8"}
    board = pd.read_parquet(store_root / "leaderboard.parquet")
    assert sorted(board["head"]) == ["knn", "logreg"]
    assert (board["train_aug_rows"] == board["train_raw_rows"]).all()


@pytest.mark.parametrize("head", list_heads())
def test_every_head_saves_and_loads_without_pickle(store_root, head):
    X, y = load_digits(return_X_y=True)
    X, y = X[:300].astype(np.float32), y[:300].astype(str)
    params = dict(get_head_spec(head).test_params)
    estimator = create_head(head, **params).fit(X, y)
    folder = save_model(store_root, estimator, head=head, lineage=lineage(), params=params,
                        threshold=None, positive_class=None)
    expected = {"xgboost": "model.ubj", "keras_dense": "model.keras",
                "ensemble": "m0-model.skops"}.get(head, "model.skops")
    assert (folder / expected).exists() and not list(folder.glob("*.joblib"))
    loaded = load_model(store_root, lineage().key, head, table=lineage())
    np.testing.assert_allclose(loaded.predict_proba(X), estimator.predict_proba(X), atol=1e-6)
    with pytest.raises(LineageMismatchError,
                       match="another lineage.*pool: model 'max' vs table 'avg'"):
        loaded.check_table(lineage("avg"))


def test_model_of_another_lineage_or_with_changed_bytes_is_refused(store_root):
    lin_max = write_digits_table(store_root, pool="max")
    lin_avg = write_digits_table(store_root, pool="avg")
    run_fit_heads(FitHeadsConfig(store=store_root, table="digits/max", heads=["logreg"],
                                 search="none", cv=3), echo=lambda s: None)
    store = Store(store_root)
    with pytest.raises(LineageMismatchError, match=f"fitted on features of table {lin_max.key}"):
        load_model(store, "digits/max", "logreg", table=store.open("digits/avg"))
    assert load_model(store, "digits/max", "logreg", table=store.open(lin_max)).head == "logreg"
    model_file = store_root / "models" / lin_max.key / "logreg" / "model.skops"
    model_file.write_bytes(model_file.read_bytes() + b"\0")
    with pytest.raises(FeatureStoreError, match="does not match the SHA-256"):
        load_model(store, lin_max.key, "logreg")
    with pytest.raises(FeatureStoreError, match="No model for head 'svm'"):
        load_model(store, lin_avg.key, "svm")


def test_parse_class_weight():
    assert parse_class_weight("0:3,1:1") == {"0": 3.0, "1": 1.0}
    assert parse_class_weight("balanced") == "balanced" and parse_class_weight("none") is None
    with pytest.raises(FeatureStoreError, match="label:weight pairs such as '0:3,1:1'; got '0=3'"):
        parse_class_weight("0=3")


def test_cli_multiclass_end_to_end(store_root):
    lin = write_digits_table(store_root, classes=(0, 1, 2), n_per_class=40)
    runner = CliRunner()
    args = ["--store", str(store_root), "--table", "digits/max", "--heads", "logreg,svm",
            "--n-trials", "2", "--cv", "3", "--metric", "accuracy", "--n-jobs", "1"]
    result = runner.invoke(fit_heads.command, args)
    assert result.exit_code == 0, result.output
    assert "Leaderboard" in result.output and "precision" in result.output
    assert (store_root / "optuna.sqlite").exists()
    for head in ("logreg", "svm"):
        assert (store_root / "models" / lin.key / head / "model.json").exists()
    # A rerun resumes both studies: no new trials, same leaderboard rows.
    again = runner.invoke(fit_heads.command, args)
    assert again.exit_code == 0, again.output
    assert len(pd.read_parquet(store_root / "leaderboard.parquet")) == 2
    bad = runner.invoke(fit_heads.command, args[:4] + ["--heads", "xgb"])
    assert bad.exit_code != 0 and "Unknown head 'xgb'. Available: ensemble, keras_dense" in bad.output


@pytest.mark.parametrize("extra, message", [
    (["--timeout", "-5"], "Invalid value for '--timeout': -5.0 is not in the range x>0."),
    (["--timeout", "nan"], "Error: timeout must be seconds > 0, or None for no limit; got nan."),
    (["--seed", "-1"], "Invalid value for '--seed': -1 is not in the range 0<=x<=4294967295."),
    (["--storage", "sqlite:////no/such/folder/optuna.sqlite"],
     "Error: Cannot open Optuna storage 'sqlite:////no/such/folder/optuna.sqlite': "
     "folder /no/such/folder does not exist."),
])
def test_cli_bad_search_arguments_are_one_line_errors(store_root, extra, message):
    write_digits_table(store_root, n_per_class=20)
    result = CliRunner().invoke(fit_heads.command, [
        "--store", str(store_root), "--table", "digits/max", "--n-trials", "1", "--cv", "2",
        *extra])
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output and not (store_root / "models").exists()


def test_cli_one_class_train_split_is_a_one_line_error(store_root):
    write_digits_table(store_root, classes=(3,), n_per_class=30)
    result = CliRunner().invoke(fit_heads.command, [
        "--store", str(store_root), "--table", "digits/max", "--n-trials", "1", "--cv", "2"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].endswith("every train row has the label 'd3'; fit-heads needs at least "
                              "two labels.") and lines[-1].startswith("Error: Table digits-")
    # Refused before any trial: no study was started.
    assert not (store_root / "optuna.sqlite").exists()


def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def test_keras_trials_run_in_a_recycled_worker_and_memory_stays_flat():
    X, y, groups, folds, objective = digits_problem(200)
    storage = optuna.storages.InMemoryStorage()
    sizes = []
    for n in (1, 3):  # resume the study, measuring between runs
        result = tune_head("keras_dense", X, y, groups, folds, objective=objective,
                            n_trials=n, storage=storage, study_name="keras",
                            fixed_params={"max_epochs": 1})
        sizes.append(rss_mb())
    assert result.n_complete + result.n_pruned == 3
    # In-process Keras fits grow ~10 MB each (6 folds between the two
    # measurements); the worker keeps that out of this process. 25 MB leaves
    # room for allocator noise.
    assert sizes[-1] - sizes[0] < 25, sizes
