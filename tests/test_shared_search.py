"""fit-heads workers sharing one study on a real PostgreSQL server (tests/pg_server.py).

Two workers (``--workers 2``) run one search with no duplicate trials and one
refit; a worker killed in a trial leaves it to Optuna's heartbeat and it is
retried; an unreachable server is one ``Error:`` line.
"""

import time
from collections import Counter

import optuna
import pytest
from click.testing import CliRunner
from optuna.trial import TrialState

from classifiers import studies
from classifiers.studies import (RETRY_OF, WORKER, AdvisoryLock, claim_refit, get_storage,
                                 storage_time)
from classifiers.tuning import tune_head
from featurestore import Store
from pipelines.cli import main as cli
from pipelines.heads.fit import FitHeadsConfig, run_fit_heads
from tests.pg_server import free_port, pg_bin, postgres_server
from tests.test_fit_heads import write_digits_table
from tests.test_tuning_concurrency import kill_in_trial_2, trials_of
from tests.tuning_worker import digits_problem

needs_postgres = pytest.mark.skipif(pg_bin() is None, reason="PostgreSQL binaries not found "
                                    "(/usr/lib/postgresql/*/bin; Debian package postgresql)")


@pytest.fixture(scope="module")
def pg_url():
    with postgres_server() as url:
        yield url


@needs_postgres
def test_two_workers_share_each_study_and_one_of_them_refits(tmp_path, pg_url):
    lin = write_digits_table(tmp_path / "store", n_per_class=40)
    config = FitHeadsConfig(store=tmp_path / "store", table=lin.key, heads=["logreg"],
                            n_trials=12, cv=3, storage=pg_url, workers=2)
    result = run_fit_heads(config, echo=lambda line: None)
    (study,) = optuna.get_all_study_summaries(pg_url)
    trials = trials_of(pg_url, study.study_name)
    assert len(trials) == 12  # exactly n_trials: counted and started under the lock
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert len({t.params["C"] for t in trials}) == 12  # no trial drawn twice
    by_worker = Counter(t.user_attrs[WORKER] for t in trials)
    assert len(by_worker) == 2, by_worker  # both workers ran trials
    # One refit: one worker saved the model, the other saw its claim and stopped.
    assert list(result.heads) == ["logreg"] and len(result.refit_elsewhere) == 1
    models = Store(tmp_path / "store").paths.models_of(lin.key)
    assert [p.name for p in models.iterdir() if not p.name.startswith(".")] == ["logreg"]
    assert len(result.leaderboard) == 1 and result.leaderboard["trials"].iloc[0] > 0


@needs_postgres
def test_a_killed_workers_trial_goes_stale_and_is_retried(tmp_path, pg_url):
    kill_in_trial_2(pg_url, "killed", tmp_path / "hanging")
    # The killed worker's lock went with its connection; its trial is still RUNNING.
    with AdvisoryLock(pg_url, timeout=5):
        assert trials_of(pg_url, "killed")[2].state == TrialState.RUNNING
    X, y, groups, folds, objective = digits_problem()
    result = tune_head("logreg", X, y, groups, folds, objective=objective, n_trials=4,
                       storage=get_storage(pg_url, heartbeat_interval=1, grace_period=2),
                       study_name="killed", fixed_params={"max_iter": 30})
    assert result.n_complete + result.n_pruned == 4 and result.n_retried == 1
    trials = trials_of(pg_url, "killed")
    assert trials[2].state == TrialState.FAIL and len(trials) == 5
    (retry,) = [t for t in trials if t.user_attrs.get(RETRY_OF) == 2]
    assert retry.params == trials[2].params


@needs_postgres
def test_refit_claims_keep_the_database_clock_whatever_the_workers_clocks(pg_url, monkeypatch):
    optuna.create_study(storage=pg_url, study_name="skew")
    since = storage_time(pg_url)  # worker b's run starts
    # Worker a's clock is an hour behind: a claim stamped by it would look older than
    # b's start, and b would refit the head a second time.
    real = time.time
    monkeypatch.setattr(studies.time, "time", lambda: real() - 3600)
    assert claim_refit(pg_url, "skew", "trial 3 of 12", since=since, worker="a") is None
    assert claim_refit(pg_url, "skew", "trial 3 of 12", since=since, worker="b") == "a"


def test_an_unreachable_database_is_one_error_line(tmp_path):
    lin = write_digits_table(tmp_path / "store", n_per_class=10)
    url = f"postgresql://nobody:secret@127.0.0.1:{free_port()}/optuna"
    out = CliRunner().invoke(cli, ["fit-heads", "--store", str(tmp_path / "store"),
                                   "--table", lin.key, "--storage", url, "--workers", "2"])
    assert out.exit_code == 2, out.output
    assert out.output.startswith("Error: Cannot open Optuna storage 'postgresql+psycopg://"
                                 "nobody:***@127.0.0.1:"), out.output
    assert "secret" not in out.output and "Traceback" not in out.output
    assert len(out.output.strip().splitlines()) == 1
