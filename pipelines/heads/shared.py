"""One head search shared by several fit-heads workers: local worker processes, one refit.

Workers (``fit-heads --workers N`` on one machine, or the same command run on
several machines with one ``--storage postgresql://...``) share each head's
Optuna study (:mod:`classifiers.studies`): trials are counted and started
under one lock, so none is duplicated, and a killed worker's trial is retried
once its heartbeat is stale. Every worker waits for the study to finish; then
the first to claim the refit (:func:`classifiers.studies.claim_refit`) fits,
evaluates and saves the head, and the others stop, so models and leaderboard
rows never clash. Local workers start on different heads (worker ``k`` on the
``k``-th), so two cores run trials of two heads side by side and meet only
on each head's last trials; the ``ensemble`` (last for every worker) is
claimed like any head, through an empty study of its own.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

from classifiers.studies import claim_refit, get_storage, storage_time, study_lock, worker_name
from classifiers.tuning import TuningResult


def refit_claimant(storage: str, search: TuningResult, since: float) -> str | None:
    """None if this worker refits the head of ``search``, else the worker that does."""
    if search.study_name is None:  # no search (``--search none``): nothing is shared
        return None
    key = f"trial {search.best_trial} of {search.n_complete + search.n_pruned}"
    return claim_refit(storage, search.study_name, key, since=since, worker=worker_name())


def claim_study(storage: str, name: str) -> str:
    """An empty study ``name`` (created if missing) whose refit workers can claim."""
    import optuna

    storage = get_storage(storage)
    with study_lock(storage):
        optuna.create_study(storage=storage, study_name=name, load_if_exists=True)
    return name


def run_workers(config, echo: Callable[[str], None] = print):
    """``run_fit_heads`` in ``config.workers`` local processes sharing one storage.

    Each worker gets ``cpu_count // workers`` BLAS/OpenMP threads, so the
    workers do not fight over cores. Returns the merged ``FitHeadsResult``:
    each head as saved by the worker that refit it.
    """
    if config.storage:
        get_storage(config.storage)  # an unreachable server fails once, not in every worker
    threads = max(1, (os.cpu_count() or 1) // config.workers)
    # n_jobs too: XGBoost and the neighbour search take threads from it, not from BLAS.
    one = dataclasses.replace(config, workers=1,
                              since=config.since or storage_time(config.storage),
                              n_jobs=config.n_jobs or threads)
    # spawn: a forked child would inherit TensorFlow's threads, which it does not support.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(config.workers, mp_context=context, initializer=_limit_threads,
                             initargs=(threads,)) as pool:
        futures = [pool.submit(_run_one, one, k) for k in range(config.workers)]
        results = [future.result() for future in futures]
    merged = results[0]
    for result in results[1:]:
        merged.heads.update(result.heads)
        merged.refit_elsewhere.update(result.refit_elsewhere)
    from pipelines.heads.leaderboard import read_leaderboard

    merged.leaderboard = read_leaderboard(config.store)
    return merged


def _limit_threads(threads: int) -> None:
    import threadpoolctl

    os.environ["OMP_NUM_THREADS"] = str(threads)
    # Read by TensorFlow when it starts, here or in a fold worker spawned from here.
    os.environ["TF_NUM_INTRAOP_THREADS"] = str(threads)
    threadpoolctl.threadpool_limits(threads)


def _run_one(config, k: int):
    from pipelines.heads.fit import run_fit_heads

    heads = list(config.heads)
    start = k % len(heads)
    config = dataclasses.replace(config, heads=heads[start:] + heads[:start])
    return run_fit_heads(config, echo=lambda line: print(
        "\n".join(f"[worker {k}] {part}" for part in line.split("\n")), flush=True))
