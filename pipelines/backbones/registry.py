"""Registry of feature-extraction backbones, in the style of timm.

A backbone is added by one decorated function that builds the headless Keras
model; the decorator carries everything a caller must not guess: feature width,
default and minimum input size, preprocessing mode, resize interpolation and
where Keras keeps the ImageNet weights::

    @register_backbone(feature_dim=1024, default_input_size=224, min_input_size=32,
                       preprocessing="torch", weights_url=..., weights_md5=...)
    def densenet121(input_shape):
        return keras.applications.DenseNet121(...)

``create_backbone(name, weights=..., input_size=..., seed=...)`` is the one
factory; ``pooled_model`` puts global max / mean reductions on top of the final
feature map so one forward pass yields every pooling.

Importing this module does not import Keras (the CLI lists the registry for its
``--backbone`` choices and must start fast); Keras is imported inside the
builders, and only Keras 3 APIs are used, so the model runs on the TensorFlow,
JAX or PyTorch backend alike.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from featurestore.errors import FeatureStoreError

#: Global poolings applied to the ``(batch, h, w, channels)`` feature map.
POOLS = ("max", "avg")

#: Preprocessing modes of ``keras.applications.imagenet_utils``; ``"raw"`` means
#: the model normalises its own 0..255 input (EfficientNet).
PREPROCESSING_MODES = ("torch", "caffe", "tf", "raw")

_TORCH_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_TORCH_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
_CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)

_KERAS_WEIGHTS = "https://storage.googleapis.com/tensorflow/keras-applications/"


class UnknownBackboneError(FeatureStoreError, ValueError):
    """The backbone name is not in the registry; the message lists known names."""


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """Everything needed to build a backbone and feed it correctly.

    ``builder(input_shape)`` returns the Keras model without top and without
    pooling, randomly initialised, whose output is the final feature map of
    shape ``(batch, h, w, feature_dim)``.
    """

    name: str
    builder: Callable
    feature_dim: int
    default_input_size: int
    min_input_size: int
    preprocessing: str
    interpolation: str = "bilinear"
    weights_url: str | None = None
    weights_md5: str | None = None

    @property
    def weights_file(self) -> str | None:
        """File name under which Keras caches the ImageNet no-top weights."""
        return self.weights_url.rsplit("/", 1)[-1] if self.weights_url else None


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(**spec_fields) -> Callable:
    """Decorator registering ``fn(input_shape) -> keras.Model`` under its name."""

    def decorate(fn: Callable) -> Callable:
        name = fn.__name__
        if name in _REGISTRY:
            raise ValueError(f"Backbone {name!r} is registered twice.")
        spec = BackboneSpec(name=name, builder=fn, **spec_fields)
        if spec.preprocessing not in PREPROCESSING_MODES:
            raise ValueError(
                f"Backbone {name!r}: preprocessing must be one of "
                f"{', '.join(PREPROCESSING_MODES)}; got {spec.preprocessing!r}."
            )
        _REGISTRY[name] = spec
        return fn

    return decorate


def list_backbones() -> list[str]:
    """Registered backbone names, sorted (the values ``--backbone`` accepts)."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    """The spec registered under ``name``; unknown names list the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownBackboneError(
            f"Unknown backbone {name!r}. Available: {', '.join(list_backbones())}."
        ) from None


def check_input_size(spec: BackboneSpec, input_size: int | None) -> int:
    """The square input side to use: ``input_size`` or the spec's default."""
    size = spec.default_input_size if input_size is None else int(input_size)
    if size < spec.min_input_size:
        raise ValueError(
            f"image_size must be at least {spec.min_input_size} for backbone "
            f"{spec.name!r}; got {size}."
        )
    return size


def preprocess(batch: np.ndarray, mode: str) -> np.ndarray:
    """Apply a backbone's input preprocessing in place and return the batch.

    ``batch`` is float32 RGB in 0..255, shape ``(..., h, w, 3)``. The maths is
    that of ``keras.applications.imagenet_utils.preprocess_input`` in NumPy, so
    it runs in the decode threads and never touches the Keras backend.
    """
    if mode == "torch":
        batch /= 255.0
        batch -= _TORCH_MEAN
        batch /= _TORCH_STD
    elif mode == "caffe":
        batch[...] = batch[..., ::-1]
        batch -= _CAFFE_MEAN_BGR
    elif mode == "tf":
        batch /= 127.5
        batch -= 1.0
    elif mode != "raw":
        raise ValueError(
            f"preprocessing must be one of {', '.join(PREPROCESSING_MODES)}; "
            f"got {mode!r}."
        )
    return batch


def create_backbone(
    name: str,
    *,
    weights_path: str | None = None,
    input_size: int | None = None,
    seed: int = 0,
    dtype_policy: str | None = None,
):
    """Build the headless backbone ``name``; output ``(batch, h, w, feature_dim)``.

    ``weights_path`` is a resolved weights file (see ``pipelines.backbones.weights``) or
    None for seeded random initialisation. ``dtype_policy`` (e.g.
    ``"mixed_bfloat16"``) sets the compute precision of the backbone layers.
    """
    import keras

    from pipelines.backbones import weights as weights_mod

    spec = get_spec(name)
    size = check_input_size(spec, input_size)
    with _dtype_policy(keras, dtype_policy):
        model = spec.builder((size, size, 3))
    if weights_path is not None:
        weights_mod.load_checked(model, weights_path, spec.name)
    else:
        seeded_init(model, seed)
    return model


def pooled_model(backbone, pools: Sequence[str] = POOLS):
    """Wrap a feature-map model so one forward pass returns each pooling.

    The returned model maps ``(batch, h, w, 3)`` to a list with one
    ``(batch, feature_dim)`` float32 array per entry of ``pools``. Reductions
    run in float32 even under a bfloat16 policy so the mean keeps its precision.
    """
    import keras

    unknown = [p for p in pools if p not in POOLS]
    if unknown or not pools:
        raise ValueError(f"pools must be a non-empty subset of {POOLS}; got {tuple(pools)}.")
    layer_for = {
        "max": lambda: keras.layers.GlobalMaxPooling2D(name="max_pool", dtype="float32"),
        "avg": lambda: keras.layers.GlobalAveragePooling2D(name="avg_pool", dtype="float32"),
    }
    feature_map = keras.ops.cast(backbone.output, "float32")
    outputs = [layer_for[p]()(feature_map) for p in pools]
    return keras.Model(backbone.input, outputs, name=f"{backbone.name}_pooled")


# Kernel attributes of Keras layers and the initializer attributes that may have drawn
# each (DepthwiseConv2D keeps its kernel in ``kernel`` but its initializer apart).
_KERNELS = (("kernel", ("kernel_initializer", "depthwise_initializer")),
            ("depthwise_kernel", ("depthwise_initializer",)),
            ("pointwise_kernel", ("pointwise_initializer",)))


def seeded_init(model, seed: int) -> None:
    """Overwrite the model's random weights with NumPy draws seeded by ``seed``.

    Keras' own initialisers draw from the backend's generator (and
    ``keras.utils.set_random_seed`` imports TensorFlow whenever it is
    installed), so ``random:<seed>`` would mean other weights on each backend.
    Instead every kernel is drawn uniformly with the variance its Keras
    initialiser asks for, from ``default_rng([seed, layer, kernel])``; constant
    variables (biases, batch-norm statistics) keep Keras' values. The same seed
    thus gives the same weights on every backend and machine, and no global
    random state is touched.
    """
    for layer_index, layer in enumerate(model.layers):
        for kernel_index, (name, init_names) in enumerate(_KERNELS):
            variable = getattr(layer, name, None)
            if variable is None or not hasattr(variable, "assign"):
                continue
            shape = tuple(variable.shape)
            initializer = next((getattr(layer, n) for n in init_names if hasattr(layer, n)), None)
            std = _initializer_std(initializer, shape, variable)
            rng = np.random.default_rng([int(seed), layer_index, kernel_index])
            limit = np.sqrt(3.0) * std  # uniform(-a, a) has variance a^2 / 3
            variable.assign(rng.uniform(-limit, limit, size=shape).astype(np.float32))


def _initializer_std(initializer, shape, variable) -> float:
    """Standard deviation a Keras ``VarianceScaling`` initializer targets for ``shape``."""
    mode = getattr(initializer, "mode", None)  # set on every VarianceScaling subclass
    if mode not in ("fan_in", "fan_out", "fan_avg"):  # another kind: keep Keras' spread
        return float(np.std(np.asarray(variable)))
    receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    fan_in = shape[-2] * receptive if len(shape) > 1 else shape[0]
    fan_out = shape[-1] * receptive
    fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
    return float(np.sqrt(initializer.scale / max(1.0, fan)))


class _dtype_policy:
    """Temporarily set Keras' global dtype policy while a model is built."""

    def __init__(self, keras, policy: str | None):
        self.keras, self.policy = keras, policy

    def __enter__(self):
        self.previous = self.keras.config.dtype_policy()
        if self.policy is not None:
            self.keras.config.set_dtype_policy(self.policy)

    def __exit__(self, *exc):
        self.keras.config.set_dtype_policy(self.previous)


# --------------------------------------------------------------------------
# Registered backbones: thin wrappers over keras.applications, headless and
# unpooled. The MD5 sums are those keras.applications checks its downloads with.


def _headless(app_name: str, input_shape):
    import keras

    app = getattr(keras.applications, app_name)
    return app(include_top=False, weights=None, input_shape=input_shape, pooling=None)


@register_backbone(
    feature_dim=1024, default_input_size=224, min_input_size=32, preprocessing="torch",
    weights_url=_KERAS_WEIGHTS + "densenet/densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
    weights_md5="30ee3e1110167f948a6b9946edeeb738",
)
def densenet121(input_shape):
    return _headless("DenseNet121", input_shape)


@register_backbone(
    feature_dim=1664, default_input_size=224, min_input_size=32, preprocessing="torch",
    weights_url=_KERAS_WEIGHTS + "densenet/densenet169_weights_tf_dim_ordering_tf_kernels_notop.h5",
    weights_md5="b8c4d4c20dd625c148057b9ff1c1176b",
)
def densenet169(input_shape):
    return _headless("DenseNet169", input_shape)


@register_backbone(
    feature_dim=1920, default_input_size=224, min_input_size=32, preprocessing="torch",
    weights_url=_KERAS_WEIGHTS + "densenet/densenet201_weights_tf_dim_ordering_tf_kernels_notop.h5",
    weights_md5="c13680b51ded0fb44dff2d8f86ac8bb1",
)
def densenet201(input_shape):
    return _headless("DenseNet201", input_shape)


@register_backbone(
    feature_dim=2048, default_input_size=224, min_input_size=32, preprocessing="caffe",
    weights_url=_KERAS_WEIGHTS + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
    weights_md5="4d473c1dd8becc155b73f8504c6f6626",
)
def resnet50(input_shape):
    return _headless("ResNet50", input_shape)


@register_backbone(
    feature_dim=2048, default_input_size=299, min_input_size=71, preprocessing="tf",
    weights_url=_KERAS_WEIGHTS + "xception/xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
    weights_md5="b0042744bf5b25fce3cb969f33bebb97",
)
def xception(input_shape):
    return _headless("Xception", input_shape)


@register_backbone(
    feature_dim=1280, default_input_size=224, min_input_size=32, preprocessing="raw",
    weights_url="https://storage.googleapis.com/keras-applications/efficientnetb0_notop.h5",
    weights_md5="50bc09e76180e00e4465e1a485ddc09d",
)
def efficientnetb0(input_shape):
    return _headless("EfficientNetB0", input_shape)
