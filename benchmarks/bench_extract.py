"""Benchmark of ``featurestore extract`` on CPU, against the plain Keras way.

Usage::

    python benchmarks/bench_extract.py [all|compare|steady|matmul|bf16|rss|runtimes|layouts|
                                        commits|zoo] [--images N]

Sections (``all`` runs each once, in this order; a few minutes on 2 cores):

compare
    On one generated folder of 2048x2048 grayscale JPEG "scans", times (a) what
    users started from, ``keras.utils.image_dataset_from_directory`` plus
    ``model.predict`` of ``DenseNet121(include_top=False, pooling=...)``, once
    per pooling, against (b) ``run_extract(pool="both")``: one pass, two tables,
    and against (c) two ``run_extract`` runs, ``pool="max"`` then ``"avg"``.
    End to end: decode, model build, inference, and (b, c) writing the tables.
steady
    Several fresh runs of the extraction with one in-process worker (the
    backend's own threading) and with one pinned worker per core; prints each
    run's images/s and the spread.
matmul
    This machine's float32 matmul throughput, and the fraction of it that the
    extraction reaches (DenseNet121 costs about 5.7 GFLOPs per 224x224 image).
bf16
    float32 against bfloat16 compute: speed, feature drift, and whether a
    logistic-regression head trained on float32 features scores the same on
    bfloat16 ones.
runtimes
    ``--runtime keras`` against ``--runtime openvino`` end to end on one folder
    at 224 px (process start, conversion or cache load, decode included), the
    seed-style baseline against openvino, openvino's steady speed over 5 fresh
    runs, and the features' max relative L2 to keras'. Then the share of the
    oneDNN float32 peak, computed as ``img/s x 5.7 GFLOPs per image / peak``
    where the peak is an OpenVINO MatMul 2048^2 on all cores (the kernels the
    runtime uses, not numpy's BLAS): once for the whole extraction (the steady
    runs' mean) and once for the backbone alone on decoded batches; and the
    CPU-ms per image of read, hash, decode and preprocess, with the bound they
    put on end to end (cores / (their CPU-ms + the backbone's CPU-ms)).
layouts
    openvino end to end in the layouts the default was picked from: one process
    with one stream per core (the default), one process with one stream of all
    cores (latency mode), one pinned process per core; run twice, interleaved.
commits
    Parts per table, write, consolidation and read time of an 8,192-row table
    written as extract writes it, committing by rows only vs also every 60 s,
    at 2 and 17 img/s (a virtual clock drives the writer's own rule).
zoo
    Every registered backbone at a small input: openvino's features against
    keras' (max relative L2; the runtimes share tables only within 1e-5).
rss
    Resident memory (parent plus workers) sampled while 1,000 and then 5,000
    small images are extracted; flat means the peak does not grow with N.

Every case runs in a fresh Python process so backends start cold and one case's
threads or memory do not leak into the next. Weights are random (``none``):
this machine has no internet, and the cost of the network does not depend on
its weights. Timings on a shared machine vary with its load, printed per section.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.extract_cases import (DENSENET121_GFLOPS, load, make_scans,  # noqa: E402
                                      max_relative_l2, run_case)

# -- sections --------------------------------------------------------------------------


def section_compare(work: Path, n_images: int) -> None:
    folder = make_scans(work / "scans", n_images)
    print(f"\n== compare: {n_images} generated 2048x2048 JPEG scans, DenseNet121 at 224, "
          f"CPU ({load()})")
    base = [run_case("baseline", folder=str(folder), pool=pool) for pool in ("max", "avg")]
    ours = run_case("extract", folder=str(folder), store=str(work / "store-compare"), pool="both")
    base_s = sum(b["wall"] for b in base)
    for pool, b in zip(("max", "avg"), base):
        print(f"  (a) Keras image_dataset_from_directory + predict, pooling={pool}: "
              f"{b['wall']:.1f} s wall ({b['images'] / b['wall']:.1f} img/s)")
    print(f"  (a) both poolings, total: {base_s:.1f} s, {base[0]['cpu_seconds'] + base[1]['cpu_seconds']:.0f} CPU-s")
    print(f"  (b) extract --pool both ({ours['workers']} workers): {ours['wall']:.1f} s wall, "
          f"{ours['cpu_seconds']:.0f} CPU-s, {ours['images'] / ours['compute_seconds']:.1f} img/s "
          f"once the models are built")
    print(f"  speed-up end to end: {base_s / ours['wall']:.2f}x (target >= 2x)")
    separate = [run_case("extract", folder=str(folder), store=str(work / f"store-{pool}"), pool=pool)
                for pool in ("max", "avg")]
    separate_s = sum(r["wall"] for r in separate)
    print(f"  (c) extract --pool max, then --pool avg: {separate_s:.1f} s wall; one pass for both "
          f"is {separate_s / ours['wall']:.2f}x faster (target >= 1.8x)")


def section_steady(work: Path, n_images: int, runs: int) -> dict:
    folder = make_scans(work / "steady", n_images)
    print(f"\n== steady: {runs} fresh runs x {n_images} images at 224 ({load()})")
    rates = {}
    for workers in (1, 2):
        rates[workers] = []
        for r in range(runs):
            res = run_case("extract", folder=str(folder), store=str(work / f"steady-{workers}-{r}"),
                           pool="both", workers=workers)
            rates[workers].append(res["images"] / res["compute_seconds"])
        arr = np.array(rates[workers])
        label = "1 process, backend threading" if workers == 1 else "2 pinned workers, 1 core each"
        print(f"  {label:32s}: " + ", ".join(f"{v:.1f}" for v in arr) +
              f" img/s; mean {arr.mean():.1f}, min/max {arr.min() / arr.max():.2f} ({load()})")
    return rates


def section_matmul(rates: dict | None) -> None:
    print(f"\n== matmul ({load()})")
    mm = max((run_case("matmul") for _ in range(3)), key=lambda r: r["gflops"])
    print(f"  float32 matmul 2048x2048 ({mm['backend']}): {mm['gflops']:.0f} GFLOP/s (best of 3)")
    if rates:
        best = max(np.mean(v) for v in rates.values())
        reached = best * DENSENET121_GFLOPS
        print(f"  extraction at {best:.1f} img/s x {DENSENET121_GFLOPS} GFLOPs = {reached:.0f} GFLOP/s "
              f"= {reached / mm['gflops']:.0%} of matmul throughput")


def section_bf16(work: Path, n_images: int) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    # A faint object keeps the head's task hard enough for a drift to show.
    folder = make_scans(work / "bf16", n_images, size=512, contrast=25.0)
    print(f"\n== bf16: {n_images} scans, float32 vs bfloat16 compute ({load()})")
    feats, speed = {}, {}
    for precision in ("float32", "bfloat16"):
        store = work / f"store-{precision}"
        res = run_case("extract", folder=str(folder), store=str(store), pool="avg",
                       precision=precision)
        speed[precision] = res["images"] / res["compute_seconds"]
        with np.load(run_case("features", store=str(store))["path"]) as data:
            feats[precision] = (data["X"], data["y"])
    (X32, y), (X16, _) = feats["float32"], feats["bfloat16"]
    rel = np.linalg.norm(X16 - X32, axis=1) / np.linalg.norm(X32, axis=1)
    cos = np.sum(X16 * X32, axis=1) / (np.linalg.norm(X16, axis=1) * np.linalg.norm(X32, axis=1))
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.5, random_state=0, stratify=y)
    head = LogisticRegression(max_iter=2000).fit(X32[idx_train], y[idx_train])
    acc32, acc16 = head.score(X32[idx_test], y[idx_test]), head.score(X16[idx_test], y[idx_test])
    agree = np.mean(head.predict(X32[idx_test]) == head.predict(X16[idx_test]))
    print(f"  speed: float32 {speed['float32']:.1f} img/s, bfloat16 {speed['bfloat16']:.1f} img/s "
          f"({speed['bfloat16'] / speed['float32']:.2f}x)")
    print(f"  drift: relative L2 median {np.median(rel):.4f}, max {rel.max():.4f}; "
          f"cosine min {cos.min():.5f}")
    print(f"  head trained on float32: accuracy {acc32:.3f} on float32, {acc16:.3f} on bfloat16 "
          f"features; predictions agree on {agree:.1%}")


def section_runtimes(work: Path, n_images: int, runs: int) -> None:
    folder = make_scans(work / "runtimes", n_images)
    print(f"\n== runtimes: {n_images} generated 2048x2048 JPEG scans, DenseNet121 at 224, "
          f"pool both ({load()})")
    res, feats = {}, {}
    for name, runtime in (("keras", "keras"), ("openvino (converts)", "openvino"),
                          ("openvino (cache)", "openvino")):
        store = work / f"rt-{len(res)}"
        if name == "openvino (cache)":
            shutil.copytree(work / "rt-1" / "cache", store / "cache")
        res[name] = run_case("extract", folder=str(folder), store=str(store), pool="both",
                             runtime=runtime)
        with np.load(run_case("features", store=str(store))["path"]) as data:
            feats[name] = data["X"]
        r = res[name]
        print(f"  {name:20s}: {r['wall']:.1f} s end to end, {r['images'] / r['compute_seconds']:.1f}"
              f" img/s once built, {r['workers']} worker(s) ({load()})")
    keras_s = res["keras"]["wall"]
    print(f"  openvino vs keras end to end: {keras_s / res['openvino (converts)']['wall']:.2f}x "
          f"converting, {keras_s / res['openvino (cache)']['wall']:.2f}x from the cache "
          f"(target >= 1.4x)")
    print(f"  features: max relative L2 openvino vs keras "
          f"{max_relative_l2(feats['openvino (cache)'], feats['keras']):.2e} (tolerance 1e-5)")
    base = sum(run_case("baseline", folder=str(folder), pool=p)["wall"] for p in ("max", "avg"))
    print(f"  seed-style Keras (predict once per pooling): {base:.1f} s; openvino from the cache "
          f"is {base / res['openvino (cache)']['wall']:.2f}x faster (target >= 2.8x)")
    rates = []
    for r in range(runs):
        out = run_case("extract", folder=str(folder), store=str(_with_cache(work, f"rt-steady-{r}")),
                       pool="both", runtime="openvino")
        rates.append(out["images"] / out["compute_seconds"])
    arr = np.array(rates)
    print(f"  openvino steady over {runs} fresh runs: " + ", ".join(f"{v:.1f}" for v in arr) +
          f" img/s once built, min/max {arr.min() / arr.max():.2f} (target >= 0.9) ({load()})")
    _print_shares(work, folder, arr.mean())


def _with_cache(work: Path, name: str) -> Path:
    """A fresh store holding the converted model of the runtimes section's first openvino run."""
    store = work / name
    shutil.rmtree(store, ignore_errors=True)
    shutil.copytree(work / "rt-1" / "cache", store / "cache")
    return store


def _print_shares(work: Path, folder: Path, end_to_end: float) -> None:
    """Share of the oneDNN float32 peak = img/s x 5.7 GFLOPs per 224 px image / peak GFLOP/s,
    for the whole extraction and for the backbone alone on decoded batches."""
    peak = max(run_case("ov_matmul")["gflops"] for _ in range(3))
    alone = max((run_case("backbone", cache=str(work / "rt-1" / "cache" / "openvino"))
                 for _ in range(2)), key=lambda r: r["img_s"])
    decode = run_case("decode", folder=str(folder))["ms"]
    share = lambda rate: f"{rate * DENSENET121_GFLOPS:.0f} GFLOP/s = " \
                         f"{rate * DENSENET121_GFLOPS / peak:.0%} of the peak"
    cores = len(os.sched_getaffinity(0))
    before = sum(decode.values())
    bound = cores / ((before + alone["cpu_ms"]) / 1000)
    print(f"  oneDNN float32 peak (an OpenVINO MatMul 2048^2 on all cores, best of 3): "
          f"{peak:.0f} GFLOP/s; share = img/s x {DENSENET121_GFLOPS} GFLOPs / peak")
    print(f"  share, end to end (steady mean {end_to_end:.1f} img/s): {share(end_to_end)} "
          f"(target >= 60%)")
    print(f"  share, backbone alone (decoded batches, {alone['img_s']:.1f} img/s, "
          f"{alone['cpu_ms']:.0f} CPU-ms/img): {share(alone['img_s'])} (target >= 60%)")
    print("  before the backbone, CPU-ms per image on one core: " +
          ", ".join(f"{k} {v:.1f}" for k, v in decode.items()) +
          f"; decode is {before / (before + alone['cpu_ms']):.0%} of the CPU work, so "
          f"{cores} cores bound end to end at {bound:.1f} img/s = {share(bound)} (CPU-time "
          f"based: compare with the peak on a quiet machine only)")


def section_layouts(work: Path, n_images: int) -> None:
    """The worker layouts the openvino default was picked from, on the same images."""
    folder = make_scans(work / "runtimes", n_images)
    if not (work / "rt-1" / "cache").exists():
        run_case("extract", folder=str(folder), store=str(work / "rt-1"), pool="both",
                 runtime="openvino")
    cores = len(os.sched_getaffinity(0))
    print(f"\n== layouts: openvino, {n_images} scans, pool both, {cores} cores ({load()})")
    layouts = {f"1 process, {cores} streams x 1 thread (default)": {"workers": 1},
               f"1 process, 1 stream x {cores} threads (latency)": {"workers": 1, "streams": 1},
               f"{cores} pinned processes x 1 stream": {"workers": cores}}
    for rep in range(2):  # interleaved, so a change of load hits every layout
        for name, layout in layouts.items():
            r = run_case("extract", folder=str(folder), store=str(_with_cache(work, "layout")),
                         pool="both", runtime="openvino", **layout)
            print(f"  {name:42s}: {r['images'] / r['compute_seconds']:5.1f} img/s once built, "
                  f"{r['wall']:5.1f} s end to end, {r['cpu_seconds'] * 1000 / r['images']:4.0f} "
                  f"CPU-ms/img ({load()})")


def section_commits(work: Path, rows: int = 8192) -> None:
    """What committing by time costs: parts per table, write, consolidation and read."""
    print(f"\n== commits: a {rows} x 1024 float32 table written as extract writes it "
          f"(batches of 32, 1,024 rows per part), rows-only vs also every 60 s ({load()})")
    for fmt in ("hdf5", "parquet"):
        for rate in (2.0, 17.0):  # full-size scans on a busy CPU; this machine, quiet
            out = {}
            for name, seconds in (("rows-only", None), ("timed", 60.0)):
                root = work / f"commits-{fmt}-{rate}-{name}"
                shutil.rmtree(root, ignore_errors=True)
                out[name] = run_case("commits", root=str(root), fmt=fmt, rows=rows, rate=rate,
                                     commit_seconds=seconds)
            a, b = out["rows-only"], out["timed"]
            print(f"  {fmt:7s} at {rate:4.0f} img/s: parts {a['parts']} -> {b['parts']} "
                  f"({b['files']} files after close); write {a['write_s']:.2f} -> "
                  f"{b['write_s']:.2f} s, close {a['close_s']:.2f} -> {b['close_s']:.2f} s, "
                  f"read after close {a['read_s']:.3f} -> {b['read_s']:.3f} s "
                  f"({b['read_s'] / a['read_s']:.2f}x)")


def section_zoo(work: Path) -> None:
    from pipelines.backbones.registry import get_spec, list_backbones

    folder = make_scans(work / "zoo", 16, size=256)
    print(f"\n== zoo: openvino vs keras features of every backbone, 16 images ({load()})")
    for backbone in list_backbones():
        size = max(64, get_spec(backbone).min_input_size)
        feats = {}
        for runtime in ("keras", "openvino"):
            store = work / f"zoo-{backbone}-{runtime}"
            run_case("extract", folder=str(folder), store=str(store), pool="avg",
                     backbone=backbone, image_size=size, runtime=runtime)
            with np.load(run_case("features", store=str(store))["path"]) as data:
                feats[runtime] = data["X"]
        print(f"  {backbone:15s} at {size:3d}: max relative L2 "
              f"{max_relative_l2(feats['openvino'], feats['keras']):.2e}")


def section_rss(work: Path) -> None:
    print(f"\n== rss: parent + workers while extracting small images ({load()})")
    for n in (1000, 5000):
        folder = make_scans(work / f"rss-{n}", n, size=64, fmt="png")
        res = run_case("extract", sample_rss=True, folder=str(folder), store=str(work / f"rss-store-{n}"),
                       pool="both", image_size=64, batch_size=64)
        rss = np.array([mb for _, mb in res["rss"]])
        busy = rss[len(rss) // 3:]  # after start-up and model build
        print(f"  {n:5d} images in {res['wall']:.0f} s: peak {rss.max():.0f} MiB; during extraction "
              f"min {busy.min():.0f}, median {np.median(busy):.0f}, max {busy.max():.0f} MiB")
        if n == 5000:
            deciles = [rss[int(q * (len(rss) - 1))] for q in np.linspace(0.3, 0.95, 8)]
            print("  5000-image run, RSS from 30% to 95% of its time: " +
                  ", ".join(f"{v:.0f}" for v in deciles) + " MiB")


@click.command()
@click.argument("section", default="all",
                type=click.Choice(["all", "compare", "steady", "matmul", "bf16", "rss",
                                   "runtimes", "layouts", "commits", "zoo"]))
@click.option("--images", default=200, show_default=True, help="Images for compare.")
@click.option("--runs", default=4, show_default=True, help="Runs per mode for steady.")
@click.option("--workdir", type=click.Path(), default=None, help="Keep generated data here.")
def main(section, images, runs, workdir):
    """Run the extraction benchmark SECTION (default: all)."""
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        work = Path(workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        rates = None
        if section in ("all", "compare"):
            section_compare(work, images)
        if section in ("all", "steady"):
            rates = section_steady(work, 96, runs)
        if section in ("all", "matmul"):
            section_matmul(rates)
        if section in ("all", "bf16"):
            section_bf16(work, 128)
        if section in ("all", "rss"):
            section_rss(work)
        if section in ("all", "runtimes"):
            section_runtimes(work, images, 5)
        if section in ("all", "layouts"):
            section_layouts(work, images)
        if section in ("all", "commits"):
            section_commits(work)
        if section in ("all", "zoo"):
            section_zoo(work)


if __name__ == "__main__":
    main()
