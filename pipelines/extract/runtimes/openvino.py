"""The ``openvino`` runtime: the Keras model converted once to OpenVINO, compiled for this CPU.

The pooled Keras model is traced as a TensorFlow function and converted with
``openvino.convert_model``; the converted model is cached per recipe in the
store (``STORE/cache/openvino/``, see :mod:`.model_cache`), so a rerun loads it
without importing TensorFlow. It is compiled with ``INFERENCE_PRECISION_HINT=f32``:
OpenVINO's own default on CPUs with AMX is bfloat16, which drifted 0.4-1.2%
from the Keras features; in float32 they agree within 1e-6 relative L2.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

import numpy as np

from pipelines.backbones.registry import POOLS

MODEL_XML = "model.xml"
#: Backbones measured not to convert or not to match, with the reason.
REFUSED: dict[str, str] = {}
#: Compiled models of this process, by cache entry, threads and streams.
_COMPILED: dict[tuple[str, int], object] = {}


#: Whether it runs one inference stream per core itself (then one process is enough).
STREAMS = True

def unavailable() -> str | None:
    if importlib.util.find_spec("openvino") is None:
        return "OpenVINO is not installed (pip install openvino)."
    from pipelines.extract.recipe import keras_backend

    if keras_backend() != "tensorflow" or importlib.util.find_spec("tensorflow") is None:
        return "it converts the TensorFlow graph, and Keras runs on another backend here."
    return None


def refuses(backbone: str, precision: str) -> str | None:
    if precision != "float32":
        return ("it computes float32 only (its bf16 hint was not faster than float32 in "
                "latency mode and drifted 0.5%); use --runtime keras for bfloat16.")
    return REFUSED.get(backbone)


def cache_fields(settings) -> dict:
    """What determines the converted model: recipe, weights hash and library versions."""
    from pipelines.extract.recipe import _version

    weights = settings.weights_sha256 or (
        f"random:{settings.seed}" if settings.weights_path is None else None)
    if weights is None:
        from featurestore.scan import hash_file

        weights = hash_file(settings.weights_path)
    return {"backbone": settings.backbone, "input_size": settings.input_size, "weights": weights,
            "openvino": importlib.metadata.version("openvino"), "keras": _version("keras"),
            "tensorflow": _version("tensorflow") or _version("tensorflow-cpu")}


def convert(settings):
    """The pooled Keras model of ``settings`` as an ``openvino.Model``: one output per
    pooling of ``POOLS`` (all of them, so that one cached model serves every table)."""
    import dataclasses

    import openvino as ov
    import tensorflow as tf

    from pipelines.extract.runtimes.keras import pooled_keras_model

    keras_model = pooled_keras_model(dataclasses.replace(settings, pools=POOLS))
    size = settings.input_size
    fn = tf.function(lambda x: keras_model(x, training=False),
                     input_signature=[tf.TensorSpec((None, size, size, 3), tf.float32)])
    model = ov.convert_model(fn.get_concrete_function())
    # The traced function's own outputs come first; some graphs expose inner ones after.
    return ov.Model(model.outputs[:len(POOLS)], model.get_parameters(), "pooled")


def load_model(settings):
    """The converted model: from the store's cache when given and intact, else converted."""
    import openvino as ov

    if settings.cache_dir is None:
        return convert(settings), None
    from pipelines.extract.runtimes.model_cache import cached

    def write(folder):
        ov.save_model(convert(settings), folder / MODEL_XML, compress_to_fp16=False)

    folder, _ = cached(settings.cache_dir, cache_fields(settings), write)
    return ov.Core().read_model(folder / MODEL_XML), folder.name


def compiled_model(settings, threads: int, streams: int):
    """The model compiled for ``threads`` CPU threads in ``streams`` parallel streams (kept for
    this process's next run)."""
    import openvino as ov

    model, entry = load_model(settings)
    key = (entry, threads, streams)
    if entry is not None and key in _COMPILED:
        return _COMPILED[key]
    compiled = ov.Core().compile_model(model, "CPU", {
        "NUM_STREAMS": streams, "INFERENCE_NUM_THREADS": threads,
        "INFERENCE_PRECISION_HINT": "f32"})
    if entry is not None:
        _COMPILED[key] = compiled
    return compiled


def build(settings):
    """``predict(pixels, n)``: one request per view, ``streams`` of them in flight.

    A view alone per request makes its features a function of the view only, never of
    the batch it landed in (OpenVINO's kernels differ with the batch shape at the 1e-7
    level), so a resumed run equals an uninterrupted one and padding is never computed.
    One thread per stream takes the next view (and a free request) when its own is
    done, so a stream whose core is busy with another process takes fewer views
    instead of holding the batch back. Batch 1 costs no more CPU per image than 32.
    Plain threads, not ``AsyncInferQueue``: a queue holding a Python callback at
    interpreter exit sometimes aborted the process ("terminate called without an
    active exception").
    """
    import concurrent.futures
    import queue
    import threading

    from pipelines.extract.engine import available_cores

    threads = settings.compute_threads or len(available_cores())
    streams = min(settings.streams or threads, threads)
    compiled = compiled_model(settings, threads, streams)
    outputs = [POOLS.index(pool) for pool in settings.pools]
    widths = [compiled.outputs[i].get_partial_shape()[1].get_length() for i in outputs]
    pool = concurrent.futures.ThreadPoolExecutor(streams, thread_name_prefix="openvino")
    # Requests are made here, one per stream, and the process's first view runs alone on
    # this thread: the first infer and ``.data`` initialise pybind11 function-local
    # statics, and two streams doing that at once deadlocked (one thread waiting in
    # __cxa_guard_acquire while holding the GIL, the other waiting for the GIL inside
    # the guard: one of the 14 fresh runs of a quiet benchmark, seen with py-spy).
    free = queue.SimpleQueue()
    for _ in range(streams):
        free.put(compiled.create_infer_request())
    warm = threading.Event()

    def infer_view(image: np.ndarray) -> list[np.ndarray]:
        request = free.get()
        try:
            request.infer({0: image[None]})
            return [request.get_output_tensor(i).data.copy() for i in outputs]
        finally:
            free.put(request)

    def predict(pixels: np.ndarray, n: int) -> list[np.ndarray]:
        views = [] if warm.is_set() or not n else [infer_view(pixels[0])]
        warm.set()
        views += pool.map(infer_view, pixels[len(views):n])
        return [np.concatenate([view[k] for view in views]) if n else
                np.empty((0, width), np.float32) for k, width in enumerate(widths)]

    return predict
