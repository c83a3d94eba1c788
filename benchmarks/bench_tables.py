"""Write and read a 20,800 x 1,024 float32 table in each format, beside numpy.save/load.

The size is the container-scan training set. Targets (issue #2): a full read
into numpy within 1.5x of ``numpy.load`` and a pandas load within 3x, measured
in the same run on the same disk. Also measures the Parquet column layouts
that the format choice rests on (one fixed-size-list column vs one column per
feature) and gzip-compressed HDF5.

    python benchmarks/bench_tables.py [--rows 20800] [--dim 1024] [--repeat 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from featurestore import Lineage, Store


def timed(fn, repeat):
    """Median seconds of ``repeat`` calls, and the last result."""
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) \
        if Path(path).is_dir() else Path(path).stat().st_size


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20800)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    n, d, rep = args.rows, args.dim, args.repeat
    rng = np.random.default_rng(0)
    X = rng.random((n, d), dtype=np.float32)
    ids = [f"{i:064x}" for i in range(n)]
    labels = np.where(rng.random(n) < 0.5, "empty", "loaded")
    splits = np.where(rng.random(n) < 0.8, "train", "val")
    paths = [f"{lab}/scan_{i:06d}.png" for i, lab in enumerate(labels)]
    mb = X.nbytes / 2**20
    lin = Lineage(backbone="densenet121", weights="imagenet", weights_sha256="0" * 64,
                  pool="max", input_size=224, preprocessing="torch")
    tmp = Path(tempfile.mkdtemp(prefix="bench-tables-"))
    rows, feature_only = [], {}
    try:
        npy = tmp / "X.npy"
        t_save, _ = timed(lambda: np.save(npy, X), rep)
        t_load, _ = timed(lambda: np.load(npy), rep)
        rows.append(("numpy.save/load (baseline)", t_save, t_load, None, du(npy)))

        for fmt in ("hdf5", "parquet"):
            def write(fmt=fmt):
                shutil.rmtree(tmp / fmt, ignore_errors=True)
                store = Store(tmp / fmt)
                with store.writer(lin, formats=(fmt,)) as w:
                    w.append(X, image_id=ids, label=labels, split=splits, path=paths)
                return store
            t_w, store = timed(write, rep)

            def read_numpy(store=store, fmt=fmt):
                with store.open(lin, format=fmt) as r:
                    return r.to_numpy()
            t_r, arrays = timed(read_numpy, rep)
            assert np.array_equal(arrays.X, X)
            with store.open(lin, format=fmt) as r:
                t_x, _ = timed(r.read_features, rep)
            feature_only[fmt] = t_x

            def read_pandas(store=store, fmt=fmt):
                with store.open(lin, format=fmt) as r:
                    return r.to_pandas()
            t_p, _ = timed(read_pandas, rep)
            rows.append((f"{fmt}: Store writer / to_numpy / to_pandas", t_w, t_r, t_p,
                         du(store.table_dir(lin) / fmt)))
        parquet_dir = Store(tmp / "parquet").table_dir(lin) / "parquet"
        t_pd, df = timed(lambda: pd.read_parquet(parquet_dir), rep)
        assert len(df) == n
        rows.append(("parquet: pandas.read_parquet(folder)", None, None, t_pd, du(parquet_dir)))

        # The layout question behind the Parquet choice: one column per feature.
        wide = pa.table({f"f{i:04d}": X[:, i] for i in range(d)})
        t_ww, _ = timed(lambda: pq.write_table(wide, tmp / "wide.parquet"), max(1, rep // 2))
        t_wr, _ = timed(lambda: pq.read_table(tmp / "wide.parquet").to_pandas(), max(1, rep // 2))
        rows.append(("parquet, one column per feature", t_ww, None, t_wr, du(tmp / "wide.parquet")))

        def gzip_h5():
            with h5py.File(tmp / "gzip.h5", "w") as f:
                f.create_dataset("features", data=X, chunks=(256, d), compression="gzip")
        t_gz, _ = timed(gzip_h5, 1)
        rows.append(("hdf5 gzip (not used)", t_gz, None, None, du(tmp / "gzip.h5")))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"Table: {n} x {d} float32 = {mb:.1f} MB; median of {rep} runs\n")
    print(f"{'what':45s} {'write MB/s':>11s} {'numpy MB/s':>11s} {'pandas MB/s':>12s} "
          f"{'disk MB':>8s}")
    for what, tw, tr, tp, size in rows:
        cell = lambda t: f"{mb / t:11.0f}" if t else f"{'-':>11s}"
        print(f"{what:45s} {cell(tw)} {cell(tr)} {cell(tp):>12s} {size / 2**20:8.1f}")
    print()
    for what, _, tr, tp, _ in rows[1:3]:
        fmt = what.split(":")[0]
        print(f"{fmt}: feature matrix = {feature_only[fmt] / t_load:.2f}x numpy.load, "
              f"to_numpy (X, y, ids, groups) = {tr / t_load:.2f}x (target <= 1.5x); "
              f"to_pandas = {tp / t_load:.2f}x (target <= 3x)")
    print(f"parquet: pandas.read_parquet(folder) = {rows[3][3] / t_load:.2f}x numpy.load")


if __name__ == "__main__":
    main()
