"""Exact top-10 search over 100,000 x 1,024 features, against this machine's matmul.

Prints (issue #6): queries per second of a 1,000-query batch with the chunked
exact search, the fraction of the machine's measured float32 GEMM throughput
that it reaches, its peak extra memory against the one-shot distance matrix,
the peak memory of building an index against the table's size, and the
recall / speed / build time of the approximate indexes (faiss HNSW, and
usearch when installed) against exact search.

    python benchmarks/bench_search.py [--rows 100000] [--dim 1024] [--queries 1000]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from featurestore import Lineage, Store
from featurestore.index import SimilarityIndex
from featurestore.similarity import exact_search, normalize_rows


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 5 ms."""

    def __enter__(self):
        self.proc = psutil.Process()
        self.start = self.proc.memory_info().rss
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.extra = self.peak - self.start


def gemm_gflops(d: int) -> float:
    """Measured float32 GEMM throughput for a (1000 x d) @ (d x 16384) product."""
    rng = np.random.default_rng(1)
    A = rng.random((1000, d), dtype=np.float32)
    B = rng.random((16384, d), dtype=np.float32)
    A @ B.T
    t0, reps = time.perf_counter(), 5
    for _ in range(reps):
        A @ B.T
    return 2 * 1000 * d * 16384 * reps / (time.perf_counter() - t0) / 1e9


def clustered(n, d, rng):
    centers = rng.standard_normal((500, d)).astype(np.float32)
    return centers[rng.integers(0, 500, n)] + rng.standard_normal((n, d)).astype(np.float32)


def recall(a, b, k):
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args()
    n, d, m, k = args.rows, args.dim, args.queries, args.k
    rng = np.random.default_rng(0)
    X = clustered(n, d, rng)
    Q = X[rng.choice(n, m, replace=False)] + 0.1 * rng.standard_normal((m, d)).astype(np.float32)
    table_mb = X.nbytes / 2**20
    print(f"Table {n} x {d} float32 ({table_mb:.0f} MB), {m} queries, top-{k}")

    peak_gflops = gemm_gflops(d)
    base = normalize_rows(X)
    exact_search(Q[:50], base, k, base_prepared=True)  # warm up
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        exact = exact_search(Q, base, k, base_prepared=True)
        t_exact = time.perf_counter() - t0
    achieved = 2 * m * n * d / t_exact / 1e9
    print(f"\nExact chunked search: {t_exact:.2f} s = {m / t_exact:.0f} queries/s; "
          f"{achieved:.0f} GFLOP/s of a measured {peak_gflops:.0f} GFLOP/s GEMM "
          f"= {achieved / peak_gflops:.0%} of matmul")
    print(f"  extra memory {mem.extra / 2**20:.0f} MB (a one-shot distance matrix would be "
          f"{m * n * 4 / 2**20:.0f} MB)")

    tmp = Path(tempfile.mkdtemp(prefix="bench-search-"))
    try:
        lin = Lineage(backbone="densenet121", weights="random:0", pool="max", input_size=224,
                      preprocessing="torch")
        store = Store(tmp)
        with store.writer(lin) as w:
            w.append(X, image_id=[f"{i:064x}" for i in range(n)], label=["x"] * n)
        del base
        for kind in ("exact", "hnsw"):
            reader = store.open(lin)
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                index = SimilarityIndex.build(reader, kind=kind)
                t_build = time.perf_counter() - t0
            t0 = time.perf_counter()
            found = index.search(Q, k)
            t_search = time.perf_counter() - t0
            print(f"\nIndex {kind}: build {t_build:.1f} s, peak extra memory "
                  f"{mem.extra / 2**20:.0f} MB = {mem.extra / X.nbytes:.2f}x the table; "
                  f"search {m / t_search:.0f} queries/s, recall@{k} "
                  f"{recall(found.index, exact.index, k):.3f}")
            reader.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    try:
        from usearch.index import Index
    except ImportError:
        print("\n(usearch not installed: pip install usearch to compare it too)")
        return
    Xn, Qn = normalize_rows(X), normalize_rows(Q)
    u = Index(ndim=d, metric="ip", dtype="f32", connectivity=32, expansion_add=80,
              expansion_search=128)
    t0 = time.perf_counter()
    u.add(np.arange(n), Xn)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    keys = u.search(Qn, k).keys
    t_search = time.perf_counter() - t0
    print(f"\nusearch HNSW (same M=32, efC=80, efS=128): build {t_build:.1f} s, "
          f"search {m / t_search:.0f} queries/s, recall@{k} {recall(keys, exact.index, k):.3f}")
    print(f"\nmax RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MB")


if __name__ == "__main__":
    main()
