"""Benchmark of ``featurestore extract`` on CPU, against the plain Keras way.

Usage::

    python benchmarks/bench_extract.py [all|compare|steady|matmul|bf16|rss|runtimes|zoo]
                                       [--images N]

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
    seed-style baseline against openvino, openvino's steady speed over fresh
    runs, its share of the oneDNN float32 matmul peak (an OpenVINO MatMul, the
    kernels the runtime uses), and the features' max relative L2 to keras'.
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

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DENSENET121_GFLOPS = 5.7  # per 224x224 image, multiply and add counted apart


# -- data --------------------------------------------------------------------------


def make_scans(root: Path, n: int, size: int = 2048, fmt: str = "jpg",
               contrast: float = 80.0) -> Path:
    """``root/<class>/<i>.<fmt>``: grayscale X-ray-like images in two classes.

    "threat" images hold a dense disc of brightness ``contrast`` over the noise.
    """
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for i in range(n):
        label = ("clear", "threat")[i % 2]
        (root / label).mkdir(parents=True, exist_ok=True)
        body = 120 + 50 * np.sin(xx / (30 + i % 17)) * np.cos(yy / (25 + i % 13))
        if label == "threat":  # a dense object somewhere
            cy, cx = rng.integers(size // 5, 4 * size // 5, 2)
            body += contrast * (((yy - cy) ** 2 + (xx - cx) ** 2) < (size // 10) ** 2)
        body += rng.normal(0, 8, body.shape)
        Image.fromarray(body.clip(0, 255).astype(np.uint8), "L").save(
            root / label / f"{i:05d}.{fmt}", **({"quality": 90} if fmt == "jpg" else {}))
    return root


# -- cases, each run in a fresh process ------------------------------------------------


def case_keras_baseline(folder: str, pool: str, size: int = 224) -> dict:
    """image_dataset_from_directory + DenseNet121(pooling=pool).predict."""
    import keras

    start = time.perf_counter()
    dataset = keras.utils.image_dataset_from_directory(
        folder, image_size=(size, size), batch_size=32, shuffle=False, labels="inferred",
        color_mode="rgb", verbose=False)
    dataset = dataset.map(lambda x, y: keras.applications.densenet.preprocess_input(x))
    model = keras.applications.DenseNet121(include_top=False, weights=None, pooling=pool,
                                           input_shape=(size, size, 3))
    features = model.predict(dataset, verbose=0)
    return {"images": int(features.shape[0]), "seconds": time.perf_counter() - start}


def case_extract(folder: str, store: str, **overrides) -> dict:
    from pipelines.extract.run import ExtractConfig, run_extract

    start = time.perf_counter()
    result = run_extract(ExtractConfig(dataset=folder, store=store, weights="none",
                                       progress=False, **overrides))
    return {"images": result.views_written, "seconds": time.perf_counter() - start,
            "compute_seconds": result.seconds, "errors": len(result.errors),
            "tables": result.tables, "workers": result.workers}


def case_matmul(n: int = 2048, reps: int = 10) -> dict:
    import keras

    a = keras.random.normal((n, n), seed=1)
    b = keras.random.normal((n, n), seed=2)
    keras.ops.convert_to_numpy(keras.ops.matmul(a, b))  # warm up
    start = time.perf_counter()
    for _ in range(reps):
        out = keras.ops.matmul(a, b)
    keras.ops.convert_to_numpy(out)
    seconds = time.perf_counter() - start
    return {"gflops": 2 * n**3 * reps / seconds / 1e9, "backend": keras.config.backend()}


def case_features(store: str, pool: str = "avg") -> dict:
    from featurestore import Store

    X, y, ids, _ = Store(store).open(f"densenet121/{pool}").to_numpy()
    order = np.argsort(ids, order=["image_id", "aug_id"])
    path = Path(store) / f"features-{pool}.npz"
    np.savez(path, X=X[order], y=y[order])
    return {"path": str(path)}


def case_ov_matmul(n: int = 2048, reps: int = 20, threads: int = 0) -> dict:
    """float32 matmul throughput of OpenVINO's CPU plugin (oneDNN), as the runtime compiles it."""
    import openvino as ov
    import openvino.opset13 as ops

    a = ops.parameter([n, n], np.float32)
    b = ops.constant(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(ov.Model([ops.matmul(a, b, False, False)], [a]), "CPU",
                                       config)
    request = compiled.create_infer_request()
    x = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    request.infer({0: x})
    start = time.perf_counter()
    for _ in range(reps):
        request.infer({0: x})
    return {"gflops": 2 * n**3 * reps / (time.perf_counter() - start) / 1e9}


CASES = {"baseline": case_keras_baseline, "extract": case_extract, "matmul": case_matmul,
         "features": case_features, "ov_matmul": case_ov_matmul}


def run_case(name: str, *, sample_rss: bool = False, **kwargs) -> dict:
    """Run one case in a fresh interpreter; add its wall and CPU time (and peak RSS)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "_case", name, json.dumps(kwargs)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    samples = []
    while proc.poll() is None:
        if sample_rss:
            samples.append((time.perf_counter() - start, tree_rss_mb(proc.pid)))
        time.sleep(0.25)
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"case {name} {kwargs} failed with exit code {proc.returncode}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    report = json.loads(out.strip().splitlines()[-1])
    report["wall"] = time.perf_counter() - start
    report["cpu_seconds"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if sample_rss:
        report["rss"] = samples
    return report


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MiB (from /proc)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total / 2**20


def load() -> str:
    return "load average " + " ".join(open("/proc/loadavg").read().split()[:3])


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


def max_relative_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)).max())


def section_runtimes(work: Path, n_images: int, runs: int) -> None:
    import shutil

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
        store = work / f"rt-steady-{r}"
        shutil.copytree(work / "rt-1" / "cache", store / "cache")
        out = run_case("extract", folder=str(folder), store=str(store), pool="both",
                       runtime="openvino")
        rates.append(out["images"] / out["compute_seconds"])
    arr = np.array(rates)
    peak = max(run_case("ov_matmul")["gflops"] for _ in range(3))
    print(f"  openvino steady over {runs} fresh runs: " + ", ".join(f"{v:.1f}" for v in arr) +
          f" img/s, min/max {arr.min() / arr.max():.2f} (target >= 0.9) ({load()})")
    print(f"  oneDNN float32 matmul peak (OpenVINO MatMul 2048^2, best of 3): {peak:.0f} GFLOP/s;"
          f" extraction reaches {arr.mean() * DENSENET121_GFLOPS:.0f} GFLOP/s = "
          f"{arr.mean() * DENSENET121_GFLOPS / peak:.0%} (target >= 60%)")


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
                                   "runtimes", "zoo"]))
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
        if section in ("all", "zoo"):
            section_zoo(work)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_case":
        print(json.dumps(CASES[sys.argv[2]](**json.loads(sys.argv[3]))))
    else:
        main()
