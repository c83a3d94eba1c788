"""``extract --engine ray``: the same extraction, read, decoded and embedded on Ray Data.

A thin adapter: the driver plans from the store (``pipelines.extract.plan``,
so a rerun does only what is missing), and the rows are written by the
store's own part writer, so atomic parts, lineage, the one-row-per-key rule
and the one commit step stay the store's. Only the loop is Ray's:

* ``ray.data.from_items(tasks)`` -> :func:`decode_batch` in Ray tasks (read,
  check the bytes still hash to the image id, decode, augment, preprocess);
* -> :class:`Embedder` in an actor pool (``concurrency=actors``): each actor
  builds the recipe's model once (:class:`~pipelines.extract.engine.FeatureEngine`,
  the local engine's runtime choice), pads every batch to the same shape, and
  appends its rows to its own part writer ``pending/ray-<host>-<pid>-<id>``,
  committing one atomic part per batch;
* the driver collects what each batch did (rows written, files failed) into
  the errors table, then commits the pending parts into the tables.

Resume comes from the store, never from Ray: a killed driver leaves committed
parts in ``pending/``, which the rerun commits first and plans around. A
killed actor is restarted by Ray and its unfinished batch redone; rows it had
already committed are dropped as duplicates at commit.

Actors reserve a fraction of a CPU (``cpus_per_actor``, 0.5 by default):
whole-CPU actors on a small cluster left no CPU for the read tasks, and the
pipeline hung. A local cluster (no ``ray_address``) listens on 127.0.0.1 only
(:func:`start_local_cluster`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import math
import os
import socket
import time
import uuid
from typing import Iterator

import numpy as np

from featurestore import FeatureStoreError, Store
from featurestore.paths import table_pending
from pipelines.extract.engine import EngineSettings, FeatureEngine, _thread_env
from pipelines.extract.images import ImageDecodeError
from pipelines.extract.loader import ImageTask, ViewRecipe, decode_views

#: Seconds to wait for actors that are shutting down to let go of their part writers.
COMMIT_WAIT_S = 60


@dataclasses.dataclass(frozen=True)
class RayOptions:
    """Where and how wide the Ray engine runs."""

    address: str | None = None
    """``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``; None starts a local cluster."""
    actors: int = 2
    """Backbone actors."""
    gpus_per_actor: float = 0.0
    """GPUs each actor reserves (0 on CPU-only clusters)."""
    cpus_per_actor: float = 0.5
    """CPUs each actor reserves; fractional, so read tasks always find a CPU."""


def connect(address: str | None) -> bool:
    """Join the cluster at ``address`` (or start a local one); True if started here.

    A cluster already joined by this process is used as it is (``address`` is
    still checked, so a typo fails the same way every time).
    """
    import ray

    if address is not None:
        check_reachable(address)
    if ray.is_initialized():
        return False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    quiet = dict(logging_level="ERROR", log_to_driver=False)
    if address is None:
        start_local_cluster(**quiet)
        return True
    try:
        with loopback_node(address):
            ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError) as err:
        raise ValueError(f"Cannot join the Ray cluster at ray_address {address!r}: "
                         f"{str(err).splitlines()[0]}") from err
    return True


def start_local_cluster(**init_kwargs) -> None:
    """``ray.init`` of a single-node cluster whose servers all listen on 127.0.0.1 only."""
    import ray

    with loopback_node():
        ray.init(include_dashboard=False, **init_kwargs)


@contextlib.contextmanager
def loopback_node(address: str | None = None):
    """Within: a node started here is on 127.0.0.1; a loopback ``address`` is joined as given.

    Ray turns a loopback ``_node_ip_address`` or join address into the
    machine's address, and a node on that address binds every interface (GCS,
    raylet, workers) or that address (runtime-env agent); a second process then
    cannot join a loopback node at all. Ray keeps loopback only where it takes
    clusters to be unsupported (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), so
    that switch is off while a node starts or is joined, and back on afterwards:
    a later join of a real cluster still advertises the machine's address. The
    Ray tests check every listening socket. Other addresses are left to Ray.
    """
    from ray._private import ray_constants

    host = (address or "").removeprefix("ray://").rpartition(":")[0].strip("[]")
    if address not in (None, "auto") and not _is_loopback(host):
        yield
        return
    clusters = getattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = clusters


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


def check_reachable(address: str) -> None:
    """Fail in seconds, naming the address, when nothing listens there (Ray waits a minute)."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"ray_address must be auto, HOST:PORT or ray://HOST:PORT; "
                         f"got {address!r}.")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        raise ValueError(f"Cannot reach the Ray cluster at ray_address {address!r}: "
                         f"{err.strerror or err}.") from err


def decode_batch(batch: dict, recipe: ViewRecipe) -> dict:
    """Ray task: the tasks of ``batch`` as views, one row per view or per failed file.

    Columns: ``pixels (n, size, size, 3) float32`` (zeros for a failed file),
    ``image_id``, ``aug_id`` (-1 for a failed file), ``label``, ``split``,
    ``path``, ``aug_params`` and ``reason`` (empty unless the file failed).
    """
    columns = {k: [] for k in ("image_id", "aug_id", "label", "split", "path", "aug_params",
                               "reason")}
    pixels = []
    for task in _tasks_of(batch):
        try:
            views = [(row, view, "") for row, view in decode_views(task, recipe)]
        except ImageDecodeError as err:
            views = [(None, np.zeros((recipe.size, recipe.size, 3), np.float32), err.reason)]
        for row, view, reason in views:
            pixels.append(view)
            values = (task.image_id, -1, task.label, task.split, task.path, "") if row is None \
                else (row.image_id, row.aug_id, row.label, row.split, row.path, row.aug_params)
            for key, value in zip(columns, (*values, reason)):
                columns[key].append(value)
    return {"pixels": np.stack(pixels) if pixels else
            np.zeros((0, recipe.size, recipe.size, 3), np.float32),
            **{k: np.asarray(v, dtype=np.int64 if k == "aug_id" else object)
               for k, v in columns.items()}}


def _tasks_of(batch: dict) -> Iterator[ImageTask]:
    for i in range(len(batch["image_id"])):
        size = batch["size_bytes"][i]
        yield ImageTask(image_id=str(batch["image_id"][i]), path=str(batch["path"][i]),
                        file=str(batch["file"][i]), label=str(batch["label"][i]),
                        split=str(batch["split"][i]),
                        aug_ids=tuple(int(a) for a in batch["aug_ids"][i]),
                        size_bytes=None if size is None or size < 0 else int(size))


class Embedder:
    """Ray actor: the recipe's model, loaded once, and one part writer per table."""

    def __init__(self, settings: EngineSettings, store: str, lineages: dict, formats):
        # Thread pools sized to the actor's CPUs, before the runtime imports its backend.
        # Not through a runtime_env: Ray would start fresh processes for it (the actors
        # began building 15-20 s after the dataset started instead of 4 s, measured here).
        os.environ.update(_thread_env(settings.compute_threads or 1))
        self.engine = FeatureEngine(settings)
        writer_id = f"ray-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        store_ = Store(store, create=False)
        # Parts are committed batch by batch (flush), never by size.
        self.writers = {pool: store_.writer(lin, formats=formats, writer_id=writer_id,
                                            rows_per_part=2**31).open()
                        for pool, lin in lineages.items()}

    def __call__(self, batch: dict) -> dict:
        ok = np.flatnonzero(batch["reason"] == "")
        size = self.engine.settings.batch_size
        for start in range(0, len(ok), size):
            rows = ok[start:start + size]
            pixels = np.zeros((size, *batch["pixels"].shape[1:]), np.float32)
            pixels[:len(rows)] = batch["pixels"][rows]
            features = self.engine.embed(pixels, len(rows))
            for pool, writer in self.writers.items():
                self._append(writer, batch, rows, features[pool])
        return {k: batch[k] for k in ("path", "image_id", "reason")}

    @staticmethod
    def _append(writer, batch: dict, rows: np.ndarray, features: np.ndarray) -> None:
        keys = list(zip(batch["image_id"][rows], batch["aug_id"][rows].tolist()))
        new = ~writer.known(keys)  # this actor's own rows of a redone batch
        take = rows[new]
        writer.append(features=features[new], image_id=list(batch["image_id"][take]),
                      aug_id=batch["aug_id"][take].tolist(), label=list(batch["label"][take]),
                      split=list(batch["split"][take]), path=list(batch["path"][take]),
                      aug_params=list(batch["aug_params"][take]))
        writer.flush()  # one atomic part per batch: what a kill can cost


def run_on_ray(settings: EngineSettings, tasks: list[ImageTask], *, store: Store,
               lineages: dict, formats, options: RayOptions) -> Iterator[dict]:
    """Per-batch ``{"path", "image_id", "reason"}`` arrays as the actors finish them."""
    import ray

    cpus = options.cpus_per_actor
    # Actors are not pinned: without a share each would run on every core of its node.
    settings = dataclasses.replace(settings, compute_threads=max(1, math.ceil(cpus)))
    items = [{**dataclasses.asdict(t), "aug_ids": list(t.aug_ids),
              "size_bytes": -1 if t.size_bytes is None else t.size_bytes} for t in tasks]
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.from_items(items).map_batches(
        decode_batch, fn_kwargs={"recipe": settings.recipe}, batch_size=settings.batch_size,
        batch_format="numpy", num_cpus=min(1.0, cpus))
    ds = ds.map_batches(
        Embedder, batch_size=settings.batch_size, batch_format="numpy",
        fn_constructor_kwargs={"settings": settings, "store": str(store.root),
                               "lineages": lineages, "formats": tuple(formats)},
        # Ray Data restarts a dead actor and retries its batch by default.
        compute=ray.data.ActorPoolStrategy(size=options.actors), num_cpus=cpus,
        num_gpus=options.gpus_per_actor or None)
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")


def commit_parts(store: Store, lineages: dict) -> dict:
    """Commit every table's pending parts, waiting for actors still letting go of theirs.

    Run before planning too: the actors of a killed driver may outlive it by a
    few seconds, and their committed parts must count as done.
    """
    total = {"rows": 0, "duplicates": 0, "merged": []}
    deadline = time.monotonic() + COMMIT_WAIT_S
    for lineage in lineages.values():
        while table_pending(store.table_dir(lineage)).is_dir():
            summary = store.commit(lineage)
            for key in ("rows", "duplicates", "merged"):
                total[key] += summary[key]
            busy = [w for w in summary["skipped"] if w.startswith("ray-")]
            if not busy:
                break
            if time.monotonic() > deadline:
                raise FeatureStoreError(
                    f"Ray part writers {busy} of table {lineage.key} stayed locked for "
                    f"{COMMIT_WAIT_S} s; rerun to commit them.")
            time.sleep(0.5)
    return total


def execute(config, recipe, plan, formats, errors_log, progress) -> tuple[int, list, float]:
    """Run ``plan`` on Ray; record failed files. ``(views written, [(path, reason)], seconds)``.

    ``config`` is an ``ExtractConfig``; ``progress(n)`` is told of every ``n`` views written.
    """
    import ray

    options = RayOptions(config.ray_address, config.actors, config.gpus_per_actor)
    started_here = connect(options.address)
    try:
        store = Store(config.store, create=False)
        written, errors, started = 0, [], time.perf_counter()
        settings = recipe.engine_settings(config.batch_size, cache_dir=store.paths.openvino_cache)
        for out in run_on_ray(settings, plan.tasks,
                              store=store, lineages=recipe.lineages(),
                              formats=formats, options=options):
            failed = out["reason"] != ""
            errors_log.clear(out["path"][~failed].tolist())
            failures = [(str(p), str(i), str(r)) for p, i, r in
                        zip(out["path"][failed], out["image_id"][failed], out["reason"][failed])]
            errors_log.record(failures)
            errors += [(path, reason) for path, _, reason in failures]
            written += int((~failed).sum())
            progress(int((~failed).sum()))
        return written, errors, time.perf_counter() - started
    finally:
        if started_here:
            ray.shutdown()
