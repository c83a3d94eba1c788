"""One ``tune_head`` search of the logreg head on digits, run as its own process.

Used by ``tests/test_tuning_concurrency.py`` to put two real processes on one
SQLite study, and to kill one in the middle of a trial::

    python -m tests.tuning_worker SPEC_JSON

``SPEC_JSON`` holds ``url``, ``study``, ``n_trials``, optional ``ready`` (a
folder: the worker touches a file there and starts once ``parties`` files
exist, so the searches really overlap) and ``hang_at`` (the trial whose fits
write ``hang_marker`` and then sleep until the process is killed). Prints the result's counts as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from classifiers import get_head_spec, registry
from classifiers.cv import grouped_folds
from classifiers.heads.logreg import LogRegHead
from classifiers.metrics import make_objective
from classifiers.studies import get_storage
from classifiers.tuning import tune_head

SPEC: dict = {}
HANGING = False
#: Few lbfgs steps: a trial takes a few hundredths of a second, and the test stays short.
FIXED = {"max_iter": 30}


class SlowLogRegHead(LogRegHead):
    """logreg whose fits hang in one chosen trial."""

    def fit(self, X, y, groups=None, sample_weight=None):
        if HANGING:
            Path(SPEC["hang_marker"]).touch()
            time.sleep(600)
        return super().fit(X, y, groups=groups, sample_weight=sample_weight)


def digits_problem(n: int = 200):
    X, y = load_digits(return_X_y=True)
    X, y = X[:n].astype(np.float32), y[:n]
    groups = np.arange(n)
    folds = grouped_folds(y, groups, np.ones(n, bool), n_splits=3)
    return X, y, groups, folds, make_objective("accuracy", np.unique(y))


def use_slow_logreg() -> None:
    spec = get_head_spec("logreg")

    def space(trial):
        global HANGING
        HANGING = trial.number == SPEC.get("hang_at")
        trial.set_user_attr("pid", os.getpid())  # which process ran it
        return spec.search_space(trial)

    registry._REGISTRY["logreg"] = dataclasses.replace(spec, cls=SlowLogRegHead,
                                                       search_space=space)


def wait_for_parties(folder: Path, parties: int) -> None:
    (folder / str(os.getpid())).touch()
    deadline = time.monotonic() + 60
    while len(list(folder.iterdir())) < parties and time.monotonic() < deadline:
        time.sleep(0.05)


def main(spec: dict) -> None:
    SPEC.update(spec)
    use_slow_logreg()
    X, y, groups, folds, objective = digits_problem()
    if spec.get("ready"):
        wait_for_parties(Path(spec["ready"]), spec.get("parties", 2))
    storage = get_storage(spec["url"], heartbeat_interval=1, grace_period=2)
    result = tune_head("logreg", X, y, groups, folds, objective=objective,
                       n_trials=spec["n_trials"], storage=storage, study_name=spec["study"],
                       fixed_params=FIXED)
    print(json.dumps({"n_complete": result.n_complete, "n_pruned": result.n_pruned,
                      "n_failed": result.n_failed, "ran": len(result.trial_seconds)}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
