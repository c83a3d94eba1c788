"""Pinned worker processes for ``run_engine(..., workers=N)`` (N > 1).

One spawned process per group of cores, pinned to its cores with
``os.sched_setaffinity`` and with the backend's thread pools sized to them.
Tasks are handed out in small chunks through a bounded queue, so a worker
slowed down by a busy core simply takes fewer chunks.

Each worker answers through its own pipe, and the parent waits on the pipes
and the processes together: a worker that dies (``kill -9``, the
out-of-memory killer) stops the run within a poll interval with a
``WorkerDiedError`` naming its pid, never a hang; committed rows stay.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import signal
import time
import traceback
from typing import Iterable, Iterator

from pipelines.errors import WorkerDiedError
from pipelines.extract.engine import FeatureEngine, Result, _thread_env, core_groups
from pipelines.extract.loader import ImageTask

#: Seconds between checks that the other side of a worker queue is alive.
_POLL_S = 1.0


def _worker_main(index, settings, cores, task_q, conn):
    """Entry point of a spawned worker: pin, build, then compute until told to stop.

    Messages go to the parent through this worker's own pipe ``conn``, so a
    worker killed halfway through a message can corrupt only its own pipe,
    which the parent then reads as end-of-file.
    """
    os.environ.update(_thread_env(len(cores)))
    parent = os.getppid()
    _exit_when_orphaned(parent)
    outbox = _Outbox(conn)
    try:
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, cores)
        if os.environ.get("KERAS_BACKEND") == "torch":
            import torch

            torch.set_num_threads(len(cores))
        engine = FeatureEngine(dataclasses.replace(settings, decode_threads=len(cores)))
        outbox.send(("ready", None))
        for result in engine.run(_queued_tasks(task_q, parent)):
            outbox.send(("result", result))
        outbox.send(("done", None))
        outbox.close()
    except BaseException as err:  # report anything, then exit non-zero
        trace = traceback.format_exc()
        try:
            outbox.send(("error", (err, trace)))
        except Exception:  # the error itself does not pickle: send its text
            outbox.send(("error", (None, trace)))
        outbox.close()
        raise SystemExit(1) from None


class _Outbox:
    """Sends a worker's messages from a thread, so the worker computes on while the
    parent is busy (writing and fsyncing a part), as a ``multiprocessing.Queue``'s
    feeder thread let it. Unbounded, as that queue was: what a worker can compute is
    already bounded by the chunks the parent hands out."""

    def __init__(self, conn):
        import threading

        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, args=(conn,), name="outbox",
                                        daemon=True)
        self._thread.start()

    def _run(self, conn) -> None:
        for data in iter(self._queue.get, None):
            conn.send_bytes(data)

    def send(self, message) -> None:
        """Queue ``message``; it is pickled here, so an unpicklable one raises here."""
        from multiprocessing.reduction import ForkingPickler

        self._queue.put(bytes(ForkingPickler.dumps(message)))

    def close(self) -> None:
        """Wait until every queued message is in the pipe."""
        self._queue.put(None)
        self._thread.join()


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


def run_pool(settings, tasks, n_workers, on_ready) -> Iterator[Result]:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # never fork a process that holds a backend
    task_q = ctx.Queue(maxsize=2 * n_workers)  # bounded: the plan is fed lazily
    procs, conns = [], []
    for i, cores in enumerate(core_groups(n_workers)):
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_worker_main, args=(i, settings, cores, task_q, send),
                           daemon=True, name=f"extract-worker-{i}")
        proc.start()
        send.close()  # only the worker holds the sending end: its death reads as EOF
        procs.append(proc)
        conns.append(receive)
    pool = _Pool(procs, conns, task_q, _chunks(tasks, settings.batch_size), on_ready)
    try:
        yield from pool.results()
    finally:
        pool.stop()


class _Pool:
    """Parent side of the worker pool: feeds chunks, collects results, watches workers."""

    def __init__(self, procs, conns, task_q, chunks, on_ready):
        self.procs, self.conns, self.task_q = procs, conns, task_q
        self.chunks, self.on_ready = chunks, on_ready
        self.ready, self.done, self.fed_all, self.stops_sent = set(), set(), False, 0
        self.next_chunk = None

    def results(self) -> Iterator[Result]:
        while len(self.done) < len(self.procs):
            if len(self.ready) == len(self.procs):
                self._feed()
            for index in self._wait():
                kind, payload = self._receive(index)
                if kind is None:
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

    def _wait(self) -> list[int]:
        """Workers with a message to read or that have exited (at most one poll interval)."""
        from multiprocessing.connection import wait

        waiting = {}
        for i in range(len(self.procs)):
            if i not in self.done:
                waiting[self.conns[i]] = waiting[self.procs[i].sentinel] = i
        return sorted({waiting[w] for w in wait(list(waiting), timeout=_POLL_S)})

    def _receive(self, index: int):
        """The next message of worker ``index``; a worker gone without one is an error."""
        conn = self.conns[index]
        if conn.poll():  # a message, or end-of-file once the worker is gone
            try:
                return conn.recv()
            except (EOFError, OSError):  # gone, perhaps halfway through a message
                pass
        elif self.procs[index].is_alive():
            return None, None  # spurious wake-up: nothing to read yet
        raise self._died(index)

    def _died(self, index: int) -> WorkerDiedError:
        proc = self.procs[index]
        proc.join(timeout=_POLL_S)
        code = proc.exitcode
        if code is not None and code < 0:
            how = f"signal {-code}"
            with contextlib.suppress(ValueError):
                how += f", {signal.Signals(-code).name}"
        else:
            how = f"exit code {code}"
        return WorkerDiedError(
            f"extract worker pid {proc.pid} died ({how}; killed, or out of memory?); "
            f"committed rows are kept, rerun to resume.")

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

    def stop(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join(timeout=10)
        for conn in self.conns:
            conn.close()
        # Chunks nobody will read must not hold this process at exit (the queue's
        # feeder thread would wait for room in a pipe no worker reads any more).
        self.task_q.cancel_join_thread()
        self.task_q.close()


def _worker_error(index, err, trace) -> BaseException:
    """Re-raise a worker's own error type (e.g. WeightsError) with its traceback text."""
    if isinstance(err, Exception):
        if hasattr(err, "add_note"):  # Python >= 3.11
            err.add_note(f"(raised in extract worker {index})\n{trace}")
        return err
    return RuntimeError(f"Extract worker {index} failed:\n{trace}")
