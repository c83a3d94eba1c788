"""Load test of ``featurestore serve`` on loopback, against plain ``extract`` in the same run.

Prints (issue #15), bounded in requests and time:

1. ingest over HTTP: ``--clients`` concurrent clients upload ``--uploads`` new digit
   scans (32 px, random-weight DenseNet121) to a store of the 1,797 digits with a
   logreg head; throughput, p50/p95/p99 latency, errors, server RSS before/after,
   and the ratio to ``featurestore extract`` img/s on the same images (target >= 0.8);
2. ``--queries`` ``similar`` queries (k=10) on a ``--rows``-row table of 1,024
   features with an exact index; queries/s (target >= 200), latency, errors, RSS;
3. the batching gains, in-process (no HTTP): ingest one by one vs batches of 8
   (``--gain-images``), and ``similar`` one product per query vs concurrent queries
   gathered into one product.

    python benchmarks/bench_serve.py [--uploads 400] [--clients 8] [--queries 2000]
        [--rows 20000] [--gain-images 64] [--time-limit 600]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

from featurestore import Lineage, Store
from featurestore.index import SimilarityIndex

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``featurestore serve`` in its own process, for the ``with`` block."""

    def __init__(self, store: Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "featurestore", "serve", "--store", str(store), "--port",
             str(self.port)], env={**os.environ, "PYTHONPATH": str(ROOT)})

    def __enter__(self):
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.5)
        raise RuntimeError("server did not start")

    def rss_mb(self) -> float:
        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(30)


def hammer(n_clients: int, jobs: list, send, deadline: float):
    """Run ``send(client, job)`` over ``jobs`` from ``n_clients`` threads; latencies, errors."""
    latencies, errors, lock = [], [], threading.Lock()
    todo = iter(jobs)

    def client_loop():
        with httpx.Client(timeout=120) as client:
            while time.monotonic() < deadline:
                with lock:
                    job = next(todo, None)
                if job is None:
                    return
                t0 = time.perf_counter()
                try:
                    ok = send(client, job)
                except httpx.HTTPError as err:
                    ok = False
                    errors.append(repr(err))
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    if not ok:
                        errors.append("status")

    seconds = run_threads(n_clients, client_loop)
    return np.array(latencies), errors, seconds


def run_threads(n: int, target) -> float:
    """Seconds for ``n`` threads running ``target`` to finish."""
    threads = [threading.Thread(target=target) for _ in range(n)]
    t0 = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - t0


def report(name: str, latencies: np.ndarray, errors: list, seconds: float, rss) -> float:
    rate = len(latencies) / seconds
    p50, p95, p99 = (np.percentile(latencies, q) * 1000 for q in (50, 95, 99))
    print(f"{name}: {len(latencies)} requests in {seconds:.1f} s = {rate:.1f}/s; latency ms "
          f"p50 {p50:.0f} p95 {p95:.0f} p99 {p99:.0f}; errors {len(errors)}; server RSS "
          f"{rss[0]:.0f} -> {rss[1]:.0f} MB")
    return rate


def build_digits_store(tmp: Path, n_uploads: int):
    from pipelines.demo.data import write_digits_dataset, write_new_scans
    from pipelines.extract.run import ExtractConfig, run_extract
    from pipelines.heads.fit import FitHeadsConfig, run_fit_heads
    from pipelines.similar.index import IndexConfig, run_index

    dataset = write_digits_dataset(tmp / "digits", size=32)
    store = tmp / "store"
    run_extract(ExtractConfig(dataset=dataset, store=store, pool="max", weights="none",
                              image_size=32, workers=1, progress=False))
    run_index(IndexConfig(store=store, table="densenet121/max"))
    run_fit_heads(FitHeadsConfig(store=store, table="densenet121/max", heads=["logreg"],
                                 search="none", cv=3), echo=lambda _: None)
    scans = write_new_scans(tmp / "new" / "x", size=32, count=n_uploads)
    return store, scans


def extract_rate(store: Path, scans: list[Path]) -> float:
    """Batch extraction img/s on the same files with the table's recipe: one in-process
    engine (as the server holds), built before the clock starts, batch 32, no writes."""
    from featurestore.scan import hash_file
    from pipelines.extract.engine import FeatureEngine
    from pipelines.extract.featurize import engine_settings_for, iter_feature_batches

    lineage = Store(store).resolve("densenet121/max")
    settings = engine_settings_for(lineage, batch_size=32)
    engine = FeatureEngine(settings)
    files = [(p, hash_file(p)) for p in scans]
    t0 = time.perf_counter()
    n = sum(len(b.image_ids) for b in iter_feature_batches(files, lineage, settings,
                                                           engine=engine))
    return n / (time.perf_counter() - t0)


def extract_command_rate(tmp: Path, scans: list[Path]) -> float:
    """``featurestore extract`` (run_extract) of the same files into a fresh store: img/s of
    the whole run, scan, engine build and writes included (what a user would time)."""
    from pipelines.extract.run import ExtractConfig, run_extract

    t0 = time.perf_counter()
    run_extract(ExtractConfig(dataset=scans[0].parent.parent, store=tmp / "plain", pool="max",
                              weights="none", image_size=32, workers=1, progress=False))
    return len(scans) / (time.perf_counter() - t0)


def ingest_batching_gain(store: Path, scans: list[Path], size: int = 8) -> None:
    """In-process, no HTTP: the same session ingesting blocks of ``size`` images one by one
    and as one batch (what the server's batcher does), blocks alternating."""
    from pipelines.ingest.session import IngestSession

    session = IngestSession.open(store)
    session.warm()
    seconds = {True: 0.0, False: 0.0}
    for n, start in enumerate(range(0, len(scans) - size + 1, size)):
        block, batched = scans[start: start + size], n % 2 == 1
        t0 = time.perf_counter()
        for group in ([block] if batched else [[p] for p in block]):
            session.ingest([(p, p.name) for p in group])
        seconds[batched] += time.perf_counter() - t0
    n_each = len(scans) // size // 2 * size
    single, batched = n_each / seconds[False], n_each / seconds[True]
    print(f"ingest in-process, {n_each} images each way: one by one {single:.1f} img/s, "
          f"batches of {size} {batched:.1f} img/s: batching gain {batched / single:.2f}x")


def bench_uploads(args, tmp: Path) -> None:
    store, scans = build_digits_store(tmp, args.uploads + args.gain_images)
    command_rate = extract_command_rate(tmp, scans)  # its folder holds the spare ones too
    scans, spare = scans[: args.uploads], scans[args.uploads:]
    baseline = extract_rate(store, scans)

    def send(client, path):
        with open(path, "rb") as f:
            answer = client.post(f"{server.base}/v1/images", files={"file": (path.name, f)})
        return answer.status_code == 200 and answer.json()["new"]

    with Server(store) as server:
        before = server.rss_mb()
        lat, errors, seconds = hammer(args.clients, scans, send,
                                      time.monotonic() + args.time_limit / 2)
        rate = report(f"ingest over HTTP ({args.clients} clients)", lat, errors, seconds,
                      (before, server.rss_mb()))
        health = httpx.get(f"{server.base}/healthz").json()
        print(f"server's ingest batches: {health['ingest_batches']}, mean "
              f"{health['ingested_uploads'] / max(1, health['ingest_batches']):.1f} uploads")
    print(f"plain extract on the same {len(scans)} images: engine loop {baseline:.1f} img/s "
          f"(no writes), `featurestore extract` {command_rate:.1f} img/s (whole run); HTTP "
          f"ingest / extract = {rate / baseline:.2f} of the engine loop, "
          f"{rate / command_rate:.2f} of the command (target >= 0.8)")
    if len(spare) >= 16:
        ingest_batching_gain(store, spare)


def bench_similar(args, tmp: Path) -> None:
    lineage = Lineage(backbone="densenet121", weights="random:0", pool="max", input_size=224,
                      preprocessing="torch")
    store = Store(tmp / "big")
    X = np.random.default_rng(0).random((args.rows, 1024), dtype=np.float32)
    ids = [f"{i:064x}" for i in range(args.rows)]
    with store.writer(lineage) as writer:
        writer.append(X, image_id=ids, label=[str(i % 2) for i in range(args.rows)],
                      split=["train"] * args.rows)
    with store.open(lineage) as reader:
        SimilarityIndex.build(reader, kind="exact")
    queries = [ids[i] for i in np.random.default_rng(1).integers(0, args.rows, args.queries)]
    similar_batching_gain(store, lineage.key, queries[: args.queries // 4], args.clients)

    def send(client, image_id):
        answer = client.get(f"{server.base}/v1/images/{image_id}/similar",
                            params={"table": lineage.key, "k": 10})
        return answer.status_code == 200 and len(answer.json()) == 10

    with Server(store.root) as server:
        before = server.rss_mb()
        lat, errors, seconds = hammer(args.clients, queries, send,
                                      time.monotonic() + args.time_limit / 2)
        rate = report(f"similar on {args.rows} rows", lat, errors, seconds,
                      (before, server.rss_mb()))
    print(f"similar queries/s: {rate:.0f} (target >= 200)")


def similar_batching_gain(store: Store, key: str, queries: list[str], n_threads: int) -> None:
    """In-process, no HTTP, one BLAS thread as in the server: ``n_threads`` threads asking
    the server's searcher, with one product per query, then with concurrent queries
    gathered into one product."""
    from threadpoolctl import threadpool_limits

    from pipelines.serve.searchers import Searchers

    rates = {}
    with threadpool_limits(1, user_api="blas"):
        for gather in (False, True):
            searchers = Searchers(store, gather=gather)
            searchers.records(key, queries[0], 10)  # opened before the clock starts
            todo, lock = iter(queries), threading.Lock()

            def loop():
                while True:
                    with lock:
                        query = next(todo, None)
                    if query is None:
                        return
                    searchers.records(key, query, 10)

            rates[gather] = len(queries) / run_threads(n_threads, loop)
    print(f"similar in-process, {n_threads} threads, {len(queries)} queries: one product each "
          f"{rates[False]:.0f} q/s, gathered {rates[True]:.0f} q/s: batching gain "
          f"{rates[True] / rates[False]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uploads", type=int, default=400)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--gain-images", type=int, default=64,
                        help="Extra new images for the in-process batching gain of ingest.")
    parser.add_argument("--time-limit", type=float, default=600.0,
                        help="Seconds for both load phases together (each gets half).")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        bench_uploads(args, tmp)
        bench_similar(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
