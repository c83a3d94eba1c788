"""Run a backbone over image tasks: in this process, or in pinned worker processes.

``FeatureEngine`` builds the pooled model once and turns an iterable of
``ImageTask`` into ``Result`` objects, one per batch: the views' rows, one
``(n, feature_dim)`` float32 array per pooling, and the files that failed.

``run_engine(settings, tasks, workers=...)`` picks how to run it:

* ``workers == 1``: in this process, with the backend's default threading (the
  right choice on a GPU, which one process keeps busy), or, for the openvino
  runtime, one inference stream per core fed by the decode threads.
* ``workers > 1``: one spawned process per group of cores, pinned to its cores
  with its thread pools sized to them (``pipelines.extract.workers``). On a
  2-core machine a single TensorFlow process spreads every op over both cores
  and runs at the pace of the slower one; whenever another process wanted a
  core, its throughput halved. Two single-core workers keep the sum.

:func:`default_workers` picks by runtime, as measured by ``benchmarks/bench_extract.py
layouts``: OpenVINO's streams need no second process (each stream is one core's
thread, and a stream slowed by a busy core takes fewer views of a batch), so it
spares the second process's start, model compile and result pipe.

Features do not depend on where a view is computed: every worker builds the
same model (same weights file or same seeded initialisation) and every batch
has the same shape (see ``pipelines.extract.loader``); the openvino runtime
computes each view alone.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Iterable, Iterator

import numpy as np

from pipelines.extract.loader import ImageTask, ViewRecipe, ViewRow, iter_batches


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """Everything a worker needs to rebuild the model and decode views (picklable)."""

    backbone: str
    input_size: int
    weights_path: str | None
    seed: int
    pools: tuple[str, ...]
    precision: str
    batch_size: int
    recipe: ViewRecipe
    decode_threads: int | None = None
    runtime: str = "keras"
    """``pipelines.extract.runtimes`` name."""
    weights_sha256: str | None = None
    """Keys the runtime's converted-model cache (None for random weights)."""
    cache_dir: str | None = None
    """Where the runtime may cache converted models (None: convert in memory)."""
    compute_threads: int | None = None
    """Threads of the runtime's inference (None: one per core this process may run on);
    set where processes share cores without being pinned (Ray actors)."""
    streams: int | None = None
    """Parallel inference streams of a runtime that has them (openvino); None: one per core."""


@dataclasses.dataclass
class Result:
    """The output of one batch."""

    rows: list[ViewRow]
    features: dict[str, np.ndarray]
    """``{pool: (len(rows), feature_dim) float32}``."""
    errors: list[tuple[str, str, str]]
    """``(path, image_id, reason)`` of files that failed."""


PRECISIONS = {"float32": None, "bfloat16": "mixed_bfloat16"}


class FeatureEngine:
    """A pooled backbone plus the decode pipeline that feeds it."""

    def __init__(self, settings: EngineSettings):
        from pipelines.extract.runtimes import check_runtime, get_runtime

        if settings.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; "
                             f"got {settings.precision!r}.")
        check_runtime(settings.runtime, settings.backbone, settings.precision)
        self.settings = settings
        self.predict = get_runtime(settings.runtime).build(settings)

    def run(self, tasks: Iterable[ImageTask]) -> Iterator[Result]:
        """Yield one ``Result`` per batch, in task order."""
        s = self.settings
        for batch in iter_batches(tasks, s.recipe, batch_size=s.batch_size,
                                  workers=s.decode_threads):
            n = len(batch.rows)
            yield Result(batch.rows, self.embed(batch.pixels, n) if n else {}, batch.errors)

    def embed(self, pixels: np.ndarray, n: int) -> dict[str, np.ndarray]:
        """``{pool: (n, feature_dim) float32}`` of the first ``n`` views of one full batch
        ``pixels (batch_size, size, size, 3)`` (the rest is padding)."""
        outputs = self.predict(pixels, n)
        return {pool: np.asarray(out, dtype=np.float32)
                for pool, out in zip(self.settings.pools, outputs)}


def accelerator_present() -> bool:
    """Whether a GPU or TPU device node is visible (checked without importing a backend)."""
    return bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/accel[0-9]*")
                or os.path.exists("/dev/kfd"))


def available_cores() -> list[int]:
    """CPU ids this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def default_workers(runtime: str | None = None) -> int:
    """One process on an accelerator or for a runtime with its own streams (openvino);
    else one per core, at most 4."""
    from pipelines.extract.runtimes import get_runtime

    if accelerator_present() or (runtime and get_runtime(runtime).STREAMS):
        return 1
    return max(1, min(4, len(available_cores())))


def core_groups(n_workers: int) -> list[list[int]]:
    """Split the available cores into ``n_workers`` contiguous groups."""
    cores = available_cores()
    if n_workers > len(cores):
        raise ValueError(f"workers must be at most the {len(cores)} available cores; "
                         f"got {n_workers}.")
    return [[int(c) for c in part] for part in np.array_split(cores, n_workers)]


def run_engine(settings: EngineSettings, tasks: Iterable[ImageTask], *, workers: int,
               on_ready=None) -> Iterator[Result]:
    """Results for ``tasks``, computed in-process (``workers == 1``) or by workers.

    ``on_ready()`` is called once the model(s) are built, before any image is
    decoded: a weights file that does not fit fails the run before any work.
    """
    if workers == 1:
        engine = FeatureEngine(settings)
        if on_ready:
            on_ready()
        yield from engine.run(tasks)
        return
    from pipelines.extract.workers import run_pool

    yield from run_pool(settings, tasks, workers, on_ready)


def _thread_env(n_threads: int) -> dict[str, str]:
    """Environment that sizes every backend's thread pools (read at import)."""
    n = str(n_threads)
    return {
        "TF_NUM_INTRAOP_THREADS": n, "TF_NUM_INTEROP_THREADS": "1",
        "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n,
        "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") +
                      f" --xla_cpu_multi_thread_eigen={'true' if n_threads > 1 else 'false'}"
                      f" intra_op_parallelism_threads={n}").strip(),
    }
