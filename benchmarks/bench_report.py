"""Benchmark ``featurestore report`` on a store of 20,000 images x 1,024 features.

Setup (not timed): 20,000 real image files (scikit-learn's digit scans, 32 x 32
PNG, a little seeded noise so every file has its own bytes), scanned into a
manifest; two feature tables (max and avg pooling) of 1,024 features computed
from the pixels through a fixed random ReLU layer plus noise, so heads learn
something and still make mistakes; heads fitted with ``run_fit_heads``
(logreg tuned by Optuna for a few trials and knn with default parameters on
the max table, logreg with defaults on the avg table).

Timed: ``run_report`` with the PCA map only, then with PCA and t-SNE (3,000
row sample per table), each with the seconds per part of the build from
``report.json``. The issue's target: under 60 s on 2 cores without t-SNE.

    python benchmarks/bench_report.py --quick      # 2,000 images: checks the script
    python benchmarks/bench_report.py              # 20,000 images (setup takes minutes)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featurestore import Lineage, Store  # noqa: E402
from featurestore.paths import StorePaths  # noqa: E402
from pipelines.heads.fit import FitHeadsConfig, run_fit_heads  # noqa: E402
from pipelines.report.run import ReportConfig, run_report  # noqa: E402
from pipelines.scan import ScanConfig, run_scan  # noqa: E402

TARGET_SECONDS = 60


def write_images(root: Path, n_images: int, seed: int = 0) -> np.ndarray:
    """``root/<digit>/<i>.png`` for ``n_images`` noisy digits; returns the 8x8 pixels (n, 64)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    pick = np.arange(n_images) % len(digits.target)
    pixels = digits.images[pick] * (255 / 16) + rng.normal(0, 8, (n_images, 8, 8))
    pixels = pixels.clip(0, 255).astype(np.uint8)
    for i, (image, digit) in enumerate(zip(pixels, digits.target[pick])):
        path = root / str(digit) / f"{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(image).resize((32, 32), Image.Resampling.BICUBIC).save(buffer, "PNG")
        path.write_bytes(buffer.getvalue())
    return pixels.reshape(n_images, 64).astype(np.float32) / 255


def write_tables(store_root: Path, pixels: np.ndarray, n_features: int) -> list[Lineage]:
    """Max- and avg-pooled stand-ins: ReLU(pixels @ W + noise), one row per manifest image."""
    images = Store(store_root).manifest().images()
    index = np.array([int(Path(p).stem) for p in images["path"]])
    rng = np.random.default_rng(1)
    weights = rng.standard_normal((64, n_features)).astype(np.float32) / 4
    lineages = []
    for pool, noise in (("max", 1.0), ("avg", 1.5)):
        X = np.maximum(pixels[index] @ weights
                       + rng.normal(0, noise, (len(index), n_features)).astype(np.float32), 0)
        lineage = Lineage(backbone="synthetic", weights="random:0", pool=pool, input_size=32,
                          preprocessing="none")
        with Store(store_root).writer(lineage) as writer:
            writer.append(X, image_id=list(images.image_id), label=list(images.label),
                          split=list(images.split), path=list(images.path))
        lineages.append(lineage)
    return lineages


def build_store(workdir: Path, n_images: int, n_features: int) -> Path:
    started = time.perf_counter()
    pixels = write_images(workdir / "images", n_images)
    store = workdir / "store"
    run_scan(ScanConfig(dataset=workdir / "images", store=store, progress=False))
    max_table, avg_table = write_tables(store, pixels, n_features)
    quiet = lambda s: None  # noqa: E731
    run_fit_heads(FitHeadsConfig(store=store, table=max_table.key, heads=["logreg"],
                                 n_trials=3), echo=quiet)
    run_fit_heads(FitHeadsConfig(store=store, table=max_table.key, heads=["knn"],
                                 search="none"), echo=quiet)
    run_fit_heads(FitHeadsConfig(store=store, table=avg_table.key, heads=["logreg"],
                                 search="none"), echo=quiet)
    print(f"Setup: {n_images:,} images, 2 tables x {n_features} features, 3 heads fitted "
          f"in {time.perf_counter() - started:.0f} s", flush=True)
    return store


def time_report(store: Path, out: Path, method: str) -> dict:
    started = time.perf_counter()
    run_report(ReportConfig(store=store, out=out, map=method), echo=lambda s: None)
    total = time.perf_counter() - started
    parts = json.loads((out / "report.json").read_text())["seconds"]
    main_part = max((k for k in parts if not k.startswith("maps:")), key=parts.get)
    print(f"  map {method:5s} total {total:6.1f} s   parts: "
          + ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
          + f"   (largest: {main_part})", flush=True)
    return {"total": total, "parts": parts}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 images")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--features", type=int, default=1024)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the store here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    n_images = args.images or (2000 if args.quick else 20_000)
    print(f"{os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        store = workdir / "store"
        if not StorePaths(store).leaderboard.exists():
            store = build_store(workdir, n_images, args.features)
        print("Report:")
        result = {"images": n_images, "features": args.features,
                  "pca": time_report(store, workdir / "report-pca", "pca"),
                  "tsne": time_report(store, workdir / "report-tsne", "tsne")}
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  peak RSS of this process (setup included): {result['peak_rss_mb']:.0f} MB")
    without = result["tsne"]["total"] - result["tsne"]["parts"].get("maps: tsne", 0.0)
    print(f"  with t-SNE, minus t-SNE itself: {without:.1f} s; target < {TARGET_SECONDS} s "
          f"on 2 cores without t-SNE")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
