"""Two real processes on one SQLite study, and a trial killed in the middle.

The searches run in subprocesses (``tests/tuning_worker.py``: logreg on 200
digits, well under a second per trial), so the file lock, the per-trial
seeds, the schema creation and the heartbeat are exercised as they are by two
``fit-heads`` runs on one store.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from classifiers import get_head_spec, registry
from classifiers.studies import RETRY_OF, get_storage
from classifiers.tuning import tune_head
from tests.tuning_worker import digits_problem

ROOT = Path(__file__).resolve().parents[1]


def start_worker(**spec) -> subprocess.Popen:
    # One BLAS thread: two workers on a small machine should not fight over cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "tests.tuning_worker", json.dumps(spec)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(worker: subprocess.Popen) -> dict:
    out, err = worker.communicate(timeout=120)
    assert worker.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def trials_of(url: str, study: str):
    return optuna.load_study(study_name=study, storage=url).get_trials(deepcopy=False)


def test_two_processes_on_one_new_study_run_exactly_n_trials_without_duplicates(tmp_path):
    # A database neither process has created: both race on the schema too.
    url = f"sqlite:///{tmp_path / 'optuna.sqlite'}"
    (tmp_path / "ready").mkdir()
    spec = dict(url=url, study="shared", n_trials=8, ready=str(tmp_path / "ready"))
    results = [finish(w) for w in [start_worker(**spec), start_worker(**spec)]]
    trials = trials_of(url, "shared")
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == 8
    assert len(trials) == 8  # nothing failed, nothing left running or waiting
    assert len({t.params["C"] for t in trials}) == 8  # each trial drew its own C
    assert len({t.user_attrs["pid"] for t in trials}) == 2  # both processes ran trials
    # Each process waited for the other's last trials: both report the whole study.
    assert all(r["n_complete"] + r["n_pruned"] == 8 and r["n_failed"] == 0 for r in results)


def kill_in_trial_2(url: str, study: str, marker: Path) -> None:
    """Start a worker on ``study`` (4 trials) and kill -9 it in the middle of trial 2."""
    worker = start_worker(url=url, study=study, n_trials=4, hang_at=2, hang_marker=str(marker))
    deadline = time.monotonic() + 90
    while not marker.exists():
        assert worker.poll() is None, worker.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the worker never reached trial 2"
        time.sleep(0.1)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()


def test_a_trial_killed_while_running_is_retried_and_does_not_count(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.sqlite'}"
    kill_in_trial_2(url, "killed", tmp_path / "hanging")
    killed = trials_of(url, "killed")[2]
    assert killed.state == TrialState.RUNNING and killed.params

    # Rerun at once: it waits out the killed trial's heartbeat (2 s here), then redoes it.
    X, y, groups, folds, objective = digits_problem()
    result = tune_head("logreg", X, y, groups, folds, objective=objective, n_trials=4,
                       storage=get_storage(url, heartbeat_interval=1, grace_period=2),
                       study_name="killed")
    assert result.n_complete + result.n_pruned == 4
    assert (result.n_failed, result.n_retried) == (0, 1)
    trials = trials_of(url, "killed")
    assert trials[2].state == TrialState.FAIL
    retry = [t for t in trials if t.user_attrs.get(RETRY_OF) == 2]
    assert len(retry) == 1 and retry[0].params == killed.params
    assert retry[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 4 and len(trials) == 5


def test_a_trial_declared_killed_while_its_process_lives_is_redone_not_an_error(
        tmp_path, monkeypatch):
    # What a second process's heartbeat check does to a trial of a suspended
    # process: it marks the trial failed behind its back.
    url = f"sqlite:///{tmp_path / 'optuna.sqlite'}"
    other = optuna.storages.RDBStorage(url)
    spec = get_head_spec("logreg")

    def space(trial):
        params = spec.search_space(trial)
        if trial.number == 1:
            study_id = other.get_study_id_from_name("suspended")
            other.set_trial_state_values(
                other.get_trial_id_from_study_id_trial_number(study_id, 1), TrialState.FAIL)
        return params

    monkeypatch.setitem(registry._REGISTRY, "logreg", dataclasses.replace(spec, search_space=space))
    X, y, groups, folds, objective = digits_problem()
    result = tune_head("logreg", X, y, groups, folds, objective=objective, n_trials=3,
                       storage=url, study_name="suspended")
    assert result.n_complete + result.n_pruned == 3 and result.n_retried == 1
    trials = trials_of(url, "suspended")
    assert trials[1].state == TrialState.FAIL
    assert [t.user_attrs.get(RETRY_OF) for t in trials] == [None, None, 1, None]
