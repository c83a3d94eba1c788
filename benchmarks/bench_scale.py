"""Benchmark of the cluster engines against the one-machine ones, in one run.

Usage::

    python benchmarks/bench_scale.py [all|extract|heads|gpu] [--images 1000] [--size 64]

Sections:

extract
    On one generated folder of ``--images`` grayscale scans: the local engine
    (one pinned worker per core) against ``--engine ray`` with 2 actors on a
    single-node Ray cluster started once beforehand (its start-up is printed
    apart: a cluster is started once, not per run), and Ray with 1 against 2
    actors. Target: Ray within 1.3x of local.
heads
    ``fit-heads`` trials per minute with 1 and with 2 workers sharing one study
    on a real PostgreSQL server (``tests/pg_server.py``), logreg on a synthetic
    4,000 x 512 table (trials/min from the trials' own start and end times,
    so process start-up and the refit are left out). Target: >= 1.6x with 2 workers on 2 cores.
gpu
    One Ray run with ``--gpus-per-actor 1`` (skipped without an accelerator): img/s.

Each case runs in a fresh process (a cold backend, no threads left from the
previous case). Weights are random (``none``). Figures on a shared machine
vary with its load: compare the ratios printed within one run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_extract import make_scans  # noqa: E402


def case_extract(folder: str, store: str, size: int, address: str | None = None,
                 **overrides) -> dict:
    from pipelines.extract.run import ExtractConfig, run_extract

    started = time.perf_counter()
    result = run_extract(ExtractConfig(dataset=folder, store=store, weights="none",
                                       image_size=size, pool="max", progress=False,
                                       ray_address=address, **overrides))
    # End to end, model builds included: the local engine's own ``seconds`` starts once its
    # workers are ready, the Ray engine's when the dataset starts (before the actors build).
    return {"views": result.views_written, "seconds": time.perf_counter() - started,
            "engine_seconds": result.seconds}


def case_fit_heads(store: str, table: str, url: str, workers: int, seed: int,
                   trials: int) -> dict:
    from pipelines.heads.fit import FitHeadsConfig, run_fit_heads

    import resource

    started = time.perf_counter()
    run_fit_heads(FitHeadsConfig(store=store, table=table, heads=["logreg"], n_trials=trials,
                                 cv=3, storage=url, workers=workers, seed=seed),
                  echo=lambda line: None)
    # This process and its (finished) workers: CPU spent, to tell slower trials from busier ones.
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return {"seconds": time.perf_counter() - started,
            "cpu_seconds": sum(u.ru_utime + u.ru_stime for u in usage)}


def in_process(case: str, env: dict | None = None, **kwargs) -> dict:
    """Run ``case_<case>(**kwargs)`` in a fresh Python process (``env`` added); its result."""
    code = (f"import json, sys; sys.path.insert(0, {str(REPO)!r}); "
            f"from benchmarks.bench_scale import case_{case}; "
            f"print('RESULT', json.dumps(case_{case}(**json.loads(sys.argv[1]))))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], cwd=REPO,
                         capture_output=True, text=True, check=False,
                         env={**os.environ, **(env or {})})
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"case {case} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


ENGINE_CLOCK = {"local": "after the workers' models were built",
                "ray": "from the dataset's start, actors' model builds included"}


def section_extract(tmp: Path, images: int, size: int) -> None:
    import ray

    from pipelines.extract.ray_engine import start_local_cluster

    folder = make_scans(tmp / "scans", images, size=256, fmt="png")
    local = in_process("extract", folder=str(folder), store=str(tmp / "local"), size=size)
    started = time.perf_counter()
    start_local_cluster(logging_level="ERROR", log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    print(f"Ray cluster start-up: {time.perf_counter() - started:.1f} s (once, not per run)")
    try:
        runs = {n: in_process("extract", folder=str(folder), store=str(tmp / f"ray{n}"),
                              size=size, address=address, engine="ray", actors=n)
                for n in (1, 2)}
    finally:
        ray.shutdown()
    rate = {k: v["views"] / v["seconds"] for k, v in
            {"local": local, "ray 1 actor": runs[1], "ray 2 actors": runs[2]}.items()}
    for name, run in {"local": local, "ray 1 actor": runs[1], "ray 2 actors": runs[2]}.items():
        print(f"  {name:>13}: {rate[name]:7.1f} img/s ({run['seconds']:.1f} s end to end, "
              f"{run['engine_seconds']:.1f} s {ENGINE_CLOCK[name.split()[0]]})")
    print(f"Ray (2 actors) / local wall time: {runs[2]['seconds'] / local['seconds']:.2f}x "
          f"(target <= 1.3x); Ray 2 vs 1 actors: "
          f"{rate['ray 2 actors'] / rate['ray 1 actor']:.2f}x")


def section_heads(tmp: Path, rows: int, dim: int, trials: int = 24) -> None:
    from featurestore import Lineage, Store
    from tests.pg_server import postgres_server

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, rows)
    X = (rng.normal(size=(rows, dim)) + 0.3 * y[:, None]).astype(np.float32)
    lineage = Lineage(backbone="synthetic", weights="random:0", pool="max", input_size=8,
                      preprocessing="none")
    with Store(tmp / "store").writer(lineage) as writer:
        writer.append(X, image_id=[f"{i:064x}" for i in range(len(y))],
                      label=[f"c{v}" for v in y],
                      split=np.where(rng.random(len(y)) < 0.8, "train", "test").tolist())
    per_min = {}
    # 2 workers get one BLAS thread each; "1 thread" is the same work per process, alone.
    cases = {"1 worker": (1, None), "1 worker, 1 thread": (1, {"OMP_NUM_THREADS": "1"}),
             "2 workers": (2, None)}
    for name, (workers, env) in cases.items():
        # A fresh server each, same seed: every search draws the same parameters per trial.
        with postgres_server() as url:
            run = in_process("fit_heads", env=env, store=str(tmp / "store"), url=url,
                             table=lineage.key, workers=workers, seed=0, trials=trials)
            span, at_once = search_seconds(url)
        per_min[name] = trials * 60 / span
        # Near 2 trials at once with no gain: the trials slowed (cores not free), not serialised.
        print(f"  {name:>18}: {per_min[name]:6.1f} trials/min ({span:.1f} s from the first "
              f"trial's start to the last's end, {at_once:.2f} trials running at once; "
              f"{run['seconds']:.1f} s with process start-up and the refit, "
              f"{run['cpu_seconds']:.1f} CPU s)")
    print(f"2 workers vs 1: {per_min['2 workers'] / per_min['1 worker']:.2f}x, vs 1 with one "
          f"thread: {per_min['2 workers'] / per_min['1 worker, 1 thread']:.2f}x "
          f"(target >= 1.6x)")


def search_seconds(url: str) -> tuple[float, float]:
    """``(seconds from the first trial's start to the last trial's end, mean trials running
    at once)`` of the one study at ``url``."""
    import optuna

    (name,) = [s.study_name for s in optuna.get_all_study_summaries(url)]
    trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    start = min(t.datetime_start for t in trials)
    span = (max(t.datetime_complete for t in trials) - start).total_seconds()
    busy = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials)
    return span, busy / span


def section_gpu(tmp: Path, images: int, size: int) -> None:
    from pipelines.extract.engine import accelerator_present

    if not accelerator_present():
        print("gpu: no accelerator here; skipped")
        return
    folder = make_scans(tmp / "gpu-scans", images, size=256, fmt="png")
    run = in_process("extract", folder=str(folder), store=str(tmp / "gpu"), size=size,
                     engine="ray", actors=1, gpus_per_actor=1.0)
    print(f"  ray, 1 actor, 1 GPU: {run['views'] / run['seconds']:.1f} img/s")


@click.command()
@click.argument("section", default="all", type=click.Choice(["all", "extract", "heads", "gpu"]))
@click.option("--images", default=1000, show_default=True)
@click.option("--size", default=64, show_default=True, help="Backbone input side.")
@click.option("--rows", default=4000, show_default=True,
              help="fit-heads table rows: more rows, longer (more CPU-bound) trials.")
@click.option("--dim", default=512, show_default=True, help="fit-heads feature dimension.")
def main(section, images, size, rows, dim):
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        tmp = Path(tmp)
        if section in ("all", "extract"):
            print(f"== extract: {images} images, DenseNet121 at {size} px")
            section_extract(tmp, images, size)
        if section in ("all", "heads"):
            print(f"== fit-heads on PostgreSQL: logreg, {rows:,} x {dim:,}")
            section_heads(tmp, rows, dim)
        if section in ("all", "gpu"):
            print("== gpu")
            section_gpu(tmp, images, size)


if __name__ == "__main__":
    main()
