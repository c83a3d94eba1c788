"""The data and cases of ``benchmarks/bench_extract.py``: each case runs in a fresh process.

``run_case(name, **kwargs)`` starts ``python extract_cases.py _case NAME JSON`` so that
backends start cold and one case's threads or memory do not leak into the next; it
returns the case's JSON report plus its wall time, CPU time and (optionally) RSS.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

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


def case_extract(folder: str, store: str, streams: int | None = None, **overrides) -> dict:
    from pipelines.extract.run import ExtractConfig, run_extract

    if streams is not None:  # a layout the CLI does not offer: set it where settings are made
        import dataclasses

        from pipelines.extract.recipe import Recipe

        plain = Recipe.engine_settings
        Recipe.engine_settings = lambda self, *a, **k: dataclasses.replace(
            plain(self, *a, **k), streams=streams)

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


def case_decode(folder: str, n: int = 32, size: int = 224) -> dict:
    """CPU milliseconds per image of each step before the backbone, on one pinned core."""
    import hashlib

    from pipelines.backbones.registry import get_spec, preprocess
    from pipelines.extract.images import decode_image, read_image_file

    os.sched_setaffinity(0, [min(os.sched_getaffinity(0))])
    files = sorted(str(p) for p in Path(folder).rglob("*.jpg"))[:n]
    mode = get_spec("densenet121").preprocessing
    steps = {"read": lambda f: read_image_file(f), "sha256": lambda d: hashlib.sha256(d),
             "decode+resize": lambda d: decode_image(d, (size, size)),
             "preprocess": lambda x: preprocess(x, mode)}
    out, items = {}, files
    for name, step in steps.items():
        start = time.process_time()
        results = [step(x) for x in items]
        out[name] = (time.process_time() - start) * 1000 / len(files)
        if name != "sha256":
            items = results
    return {"ms": out, "images": len(files)}


def case_backbone(cache: str, batches: int = 6, batch_size: int = 32,
                  streams: int | None = None) -> dict:
    """The openvino engine alone on decoded batches (model from the cache, warmed up)."""
    import resource as res

    from pipelines.extract.engine import EngineSettings, FeatureEngine
    from pipelines.extract.loader import ViewRecipe

    settings = EngineSettings(
        backbone="densenet121", input_size=224, weights_path=None, seed=0, pools=("max", "avg"),
        precision="float32", batch_size=batch_size, runtime="openvino", cache_dir=cache,
        streams=streams, recipe=ViewRecipe(size=224, preprocessing="torch"))
    engine = FeatureEngine(settings)
    pixels = np.random.default_rng(0).normal(size=(batch_size, 224, 224, 3)).astype(np.float32)
    engine.embed(pixels, batch_size)
    cpu0, start = res.getrusage(res.RUSAGE_SELF), time.perf_counter()
    for _ in range(batches):
        engine.embed(pixels, batch_size)
    seconds, cpu1 = time.perf_counter() - start, res.getrusage(res.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {"img_s": batches * batch_size / seconds, "cpu_ms": cpu * 1000 / (batches * batch_size)}


def case_commits(root: str, fmt: str, rows: int, rate: float, commit_seconds: float | None,
                 rows_per_part: int = 1024, dim: int = 1024) -> dict:
    """The table extract writes when views arrive at ``rate`` img/s, batches of 32.

    The writer's clock is a virtual one advanced by 32 / rate per batch, so its own
    commit-by-time rule decides the parts of a run of ``rows / rate`` seconds in no time.
    """
    import types

    import featurestore.writer as writer_module
    from featurestore import Lineage, Store

    clock = [0.0]
    writer_module.time = types.SimpleNamespace(monotonic=lambda: clock[0])
    lineage = Lineage(backbone="densenet121", weights="random:0", weights_sha256="0" * 64,
                      pool="max", input_size=224, preprocessing="torch")
    store, X = Store(root), np.random.default_rng(0).random((rows, dim), dtype=np.float32)
    start = time.perf_counter()
    with store.writer(lineage, formats=(fmt,), rows_per_part=rows_per_part,
                      commit_seconds=commit_seconds) as writer:
        for i in range(0, rows, 32):
            clock[0] += 32 / rate
            writer.append(X[i:i + 32], image_id=[f"{j:064x}" for j in range(i, i + 32)])
        parts = writer.parts_written
        closing = time.perf_counter()
    written = time.perf_counter()
    with store.open(lineage, format=fmt) as reader:
        assert len(reader.to_numpy().X) == rows
    read_start = time.perf_counter()
    for _ in range(3):
        with store.open(lineage, format=fmt) as reader:
            reader.to_numpy()
    files = sum(1 for p in (store.table_dir(lineage) / fmt).rglob("*") if p.is_file())
    return {"parts": parts, "files": files, "write_s": closing - start,
            "close_s": written - closing, "read_s": (time.perf_counter() - read_start) / 3}


CASES = {"baseline": case_keras_baseline, "extract": case_extract, "matmul": case_matmul,
         "features": case_features, "ov_matmul": case_ov_matmul, "decode": case_decode,
         "backbone": case_backbone, "commits": case_commits}


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


def max_relative_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)).max())


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    print(json.dumps(CASES[sys.argv[2]](**json.loads(sys.argv[3]))))
