"""Run a backbone over image tasks: in this process, or in pinned worker processes.

``FeatureEngine`` builds the pooled model once and turns an iterable of
``ImageTask`` into ``Result`` objects, one per batch: the views' rows, one
``(n, feature_dim)`` float32 array per pooling, and the files that failed.

``run_engine(settings, tasks, workers=...)`` picks how to run it:

* ``workers == 1``: in this process, with the backend's default threading (the
  right choice on a GPU, which one process keeps busy).
* ``workers > 1``: one spawned process per group of cores, pinned to its cores
  with ``os.sched_setaffinity`` and with the backend's thread pools sized to
  them. Tasks are handed out in small chunks through a bounded queue, so a
  worker slowed down by a busy core simply takes fewer chunks. On a 2-core
  machine a single TensorFlow process spreads every op over both cores and
  runs at the pace of the slower one; whenever another process wanted a core,
  its throughput halved. Two single-core workers keep the sum.

Features do not depend on where a view is computed: every worker builds the
same model (same weights file or same seeded initialisation) and every batch
has the same shape (see ``pipelines.extract.loader``).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import queue
import time
import traceback
from typing import Iterable, Iterator

import numpy as np

from pipelines.extract.loader import ImageTask, ViewRecipe, ViewRow, iter_batches

#: Seconds between checks that the other side of a worker queue is alive.
_POLL_S = 1.0


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
        from pipelines.backbones.registry import create_backbone, pooled_model

        if settings.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; "
                             f"got {settings.precision!r}.")
        self.settings = settings
        backbone = create_backbone(
            settings.backbone, weights_path=settings.weights_path, input_size=settings.input_size,
            seed=settings.seed, dtype_policy=PRECISIONS[settings.precision])
        self.model = pooled_model(backbone, settings.pools)

    def run(self, tasks: Iterable[ImageTask]) -> Iterator[Result]:
        """Yield one ``Result`` per batch, in task order."""
        s = self.settings
        for batch in iter_batches(tasks, s.recipe, batch_size=s.batch_size,
                                  workers=s.decode_threads):
            n = len(batch.rows)
            features = {}
            if n:
                outputs = self.model.predict_on_batch(batch.pixels)
                if not isinstance(outputs, (list, tuple)):
                    outputs = [outputs]
                features = {pool: np.asarray(out[:n], dtype=np.float32)
                            for pool, out in zip(s.pools, outputs)}
            yield Result(batch.rows, features, batch.errors)


def accelerator_present() -> bool:
    """Whether a GPU or TPU device node is visible (checked without importing a backend)."""
    return bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/accel[0-9]*")
                or os.path.exists("/dev/kfd"))


def available_cores() -> list[int]:
    """CPU ids this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def default_workers() -> int:
    """One process on an accelerator; else one per core, at most 4."""
    if accelerator_present():
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
    yield from _run_pool(settings, tasks, workers, on_ready)


# -- worker processes --------------------------------------------------------------


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


def _worker_main(index, settings, cores, task_q, result_q):
    """Entry point of a spawned worker: pin, build, then compute until told to stop."""
    os.environ.update(_thread_env(len(cores)))
    parent = os.getppid()
    _exit_when_orphaned(parent)
    try:
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, cores)
        if os.environ.get("KERAS_BACKEND") == "torch":
            import torch

            torch.set_num_threads(len(cores))
        engine = FeatureEngine(dataclasses.replace(settings, decode_threads=len(cores)))
        result_q.put(("ready", index, None))
        for result in engine.run(_queued_tasks(task_q, parent)):
            result_q.put(("result", index, result))
        result_q.put(("done", index, None))
    except BaseException as err:  # report anything, then exit non-zero
        result_q.put(("error", index, (err, traceback.format_exc())))
        raise SystemExit(1) from None


def _exit_when_orphaned(parent: int) -> None:
    """Exit this worker within a poll interval of its parent's death (kill -9 included).

    A check in the task loop is not enough: a worker can be blocked elsewhere
    (building the model, or flushing results into a pipe nobody reads), and a
    SystemExit raised in a decoding thread ends only that thread.
    """
    import threading

    def watch():
        while os.getppid() == parent:
            time.sleep(_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def _queued_tasks(task_q, parent: int) -> Iterator[ImageTask]:
    """Tasks from the parent's chunks until a ``None`` chunk; stop if it died."""
    while True:
        if os.getppid() != parent:  # orphaned by a kill -9: stop working
            raise SystemExit(1)
        try:
            chunk = task_q.get(timeout=_POLL_S)
        except queue.Empty:
            continue
        if chunk is None:
            return
        yield from chunk


def _chunks(tasks: Iterable[ImageTask], views_per_chunk: int) -> Iterator[list[ImageTask]]:
    chunk, views = [], 0
    for task in tasks:
        chunk.append(task)
        views += len(task.aug_ids)
        if views >= views_per_chunk:
            yield chunk
            chunk, views = [], 0
    if chunk:
        yield chunk


def _run_pool(settings, tasks, n_workers, on_ready) -> Iterator[Result]:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # never fork a process that holds a backend
    task_q = ctx.Queue(maxsize=2 * n_workers)  # bounded: the plan is fed lazily
    result_q = ctx.Queue()
    procs = [ctx.Process(target=_worker_main, args=(i, settings, cores, task_q, result_q),
                         daemon=True, name=f"extract-worker-{i}")
             for i, cores in enumerate(core_groups(n_workers))]
    for proc in procs:
        proc.start()
    pool = _Pool(procs, task_q, result_q, _chunks(tasks, settings.batch_size), on_ready)
    try:
        yield from pool.results()
    finally:
        pool.stop()


class _Pool:
    """Parent side of the worker pool: feeds chunks, collects results, watches workers."""

    def __init__(self, procs, task_q, result_q, chunks, on_ready):
        self.procs, self.task_q, self.result_q = procs, task_q, result_q
        self.chunks, self.on_ready = chunks, on_ready
        self.ready, self.done, self.fed_all, self.stops_sent = set(), set(), False, 0
        self.next_chunk = None

    def results(self) -> Iterator[Result]:
        while len(self.done) < len(self.procs):
            if len(self.ready) == len(self.procs):
                self._feed()
            try:
                kind, index, payload = self.result_q.get(timeout=_POLL_S)
            except queue.Empty:
                self._check_alive()
                continue
            if kind == "result":
                yield payload
            elif kind == "ready":
                self.ready.add(index)
                if len(self.ready) == len(self.procs) and self.on_ready:
                    self.on_ready()
            elif kind == "done":
                self.done.add(index)
            else:
                err, trace = payload
                raise _worker_error(index, err, trace)

    def _feed(self) -> None:
        """Put chunks, then one stop marker per worker, while the queue has room."""
        while not self.fed_all:
            if self.next_chunk is None:
                self.next_chunk = next(self.chunks, None)
                if self.next_chunk is None:
                    self.fed_all = True
                    break
            try:
                self.task_q.put_nowait(self.next_chunk)
            except queue.Full:
                return
            self.next_chunk = None
        while self.stops_sent < len(self.procs):
            try:
                self.task_q.put_nowait(None)
            except queue.Full:
                return
            self.stops_sent += 1

    def _check_alive(self) -> None:
        for i, proc in enumerate(self.procs):
            if i not in self.done and not proc.is_alive():
                raise RuntimeError(
                    f"Extract worker {i} (pid {proc.pid}) died with exit code {proc.exitcode} "
                    f"(killed, or out of memory?); rerun the command to resume.")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join(timeout=10)


def _worker_error(index, err, trace) -> BaseException:
    """Re-raise a worker's own error type (e.g. WeightsError) with its traceback text."""
    if isinstance(err, Exception):
        if hasattr(err, "add_note"):  # Python >= 3.11
            err.add_note(f"(raised in extract worker {index})\n{trace}")
        return err
    return RuntimeError(f"Extract worker {index} failed:\n{trace}")
