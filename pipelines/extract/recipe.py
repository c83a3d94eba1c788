"""A feature table's recipe, both ways: extraction settings <-> :class:`~featurestore.Lineage`.

``extract`` builds a :class:`Recipe` from its config and writes
``recipe.to_lineage(pool)`` for each table; ``featurize`` (and with it
``search`` and ``predict``) rebuilds the recipe with ``Recipe.from_lineage``
and runs the engine with ``recipe.engine_settings()``. One class owns both
directions, so what a table records and what reproduces it cannot drift; a
test round-trips every registered backbone x pool x precision x augmentation
preset.

A recipe's fields and their lineage spelling:

=================  ==========================================================
``backbone``       ``backbone``
``weights``        ``weights`` (``imagenet``, ``file:<name>``, ``random:<seed>``)
``weights_sha256`` ``weights_sha256``
``pools``          one table per pool: ``pool``
``input_size``     ``input_size`` (square)
``preprocessing``  ``preprocessing``
``precision``      ``precision`` (hashed only when not float32)
``runtime``        ``runtime`` (never hashed: the runtimes agree, see ``runtimes``)
``augmentation``   ``augmentation`` ``{preset, views, seed, splits}`` or None
``max_pixels``     ``max_pixels`` (None when the default; never hashed)
``interpolation``  not recorded: the backbone's (the registry's resize mode)
=================  ==========================================================
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from featurestore import Lineage, LineageMismatchError
from featurestore.lineage import DEFAULT_PRECISION, DEFAULT_RUNTIME
from featurestore.splits import SPLITS
from pipelines.backbones.registry import POOLS, BackboneSpec, check_input_size, get_spec
from pipelines.backbones.weights import (ResolvedWeights, keras_cache_dir, random_identity,
                                         random_seed, resolve_weights)
from pipelines.extract.augment import get_preset
from pipelines.extract.engine import PRECISIONS, EngineSettings
from pipelines.extract.images import DEFAULT_MAX_PIXELS
from pipelines.extract.loader import ViewRecipe
from pipelines.extract.runtimes import check_runtime, default_runtime, list_runtimes, usable_runtime

#: What may run the backbone (``Lineage.runtime``; ``pipelines.extract.runtimes``).
RUNTIMES = tuple(list_runtimes())


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Augmented views: ``views`` per image of ``splits``, drawn from ``preset`` with ``seed``."""

    preset: str
    """``pipelines.extract.augment.PRESETS`` name."""
    views: int
    """Augmented views per image (``aug_id`` 1..views; 0 is the raw view)."""
    seed: int = 0
    splits: tuple[str, ...] = ("train",)
    """Splits whose images get augmented views (kept sorted, as the lineage records them)."""

    def __post_init__(self):
        get_preset(self.preset)
        if int(self.views) < 1:
            raise ValueError(f"augment must be >= 1 views when augmenting; got {self.views}.")
        unknown = set(self.splits) - set(SPLITS)
        if unknown:
            raise ValueError(f"augment_splits must be among {', '.join(SPLITS)}; "
                             f"got {sorted(unknown)}.")
        object.__setattr__(self, "views", int(self.views))
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "splits", tuple(sorted(self.splits)))

    def to_dict(self) -> dict:
        return {"preset": self.preset, "views": self.views, "seed": self.seed,
                "splits": list(self.splits)}

    @classmethod
    def from_dict(cls, spec: Mapping) -> Augmentation:
        try:
            return cls(preset=spec["preset"], views=spec["views"], seed=spec.get("seed", 0),
                       splits=tuple(spec.get("splits", ("train",))))
        except (KeyError, TypeError) as err:
            raise LineageMismatchError(
                f"Augmentation {dict(spec)!r} is not {{preset, views, seed, splits}}.") from err


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that determines a table's features, plus where the weights file is."""

    backbone: str
    """Registered backbone name."""
    weights: str
    """Weights identity: ``imagenet``, ``file:<name>`` or ``random:<seed>``."""
    weights_sha256: str | None = None
    """SHA-256 of the weights file; None for random weights."""
    pools: tuple[str, ...] = POOLS
    """Poolings computed in one pass, one table each."""
    input_size: int | None = None
    """Square input side; None: the backbone's default. Checked against its minimum here."""
    preprocessing: str | None = None
    """Pixel preprocessing; None: the backbone's."""
    interpolation: str | None = None
    """Resize interpolation; None: the backbone's."""
    precision: str = DEFAULT_PRECISION
    """``pipelines.extract.engine.PRECISIONS`` name."""
    runtime: str = DEFAULT_RUNTIME
    """:data:`RUNTIMES` name."""
    augmentation: Augmentation | None = None
    """Augmented views, or None for raw images only."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Files with more pixels are refused without decoding."""
    weights_path: str | None = dataclasses.field(default=None, compare=False)
    """Local weights file to load (None: random, or not resolved yet); not in the lineage."""

    def __post_init__(self):
        spec = self.spec
        object.__setattr__(self, "input_size", check_input_size(spec, self.input_size))
        object.__setattr__(self, "preprocessing", self.preprocessing or spec.preprocessing)
        object.__setattr__(self, "interpolation", self.interpolation or spec.interpolation)
        pools = tuple(self.pools)
        if not pools or set(pools) - set(POOLS) or len(set(pools)) != len(pools):
            raise ValueError(f"pools must be distinct values of {', '.join(POOLS)}; "
                             f"got {pools}.")
        object.__setattr__(self, "pools", pools)
        _one_of("precision", self.precision, PRECISIONS)
        _one_of("runtime", self.runtime, RUNTIMES)
        random_seed(self.weights)  # a malformed random:<seed> fails here
        if int(self.max_pixels) < 1:
            raise ValueError(f"max_pixels must be >= 1; got {self.max_pixels}.")

    @property
    def spec(self) -> BackboneSpec:
        return get_spec(self.backbone)

    @property
    def weights_seed(self) -> int:
        """Seed of random weights (0 when the weights come from a file)."""
        return random_seed(self.weights) or 0

    # -- settings -> recipe -> lineage ------------------------------------------------

    @classmethod
    def from_config(cls, config) -> Recipe:
        """The recipe of an :class:`~pipelines.extract.run.ExtractConfig`, weights resolved.

        Every setting is checked before the weights are resolved, so a bad
        image size fails before ImageNet weights are looked for or downloaded.
        """
        augmentation = Augmentation(config.augment_preset, config.augment, config.seed,
                                    tuple(config.augment_splits)) if config.augment else None
        get_spec(config.backbone)
        _one_of("precision", config.precision, PRECISIONS)
        runtime = default_runtime(config.backbone, config.precision) if config.runtime is None \
            else check_runtime(config.runtime, config.backbone, config.precision)
        draft = cls(backbone=config.backbone, weights=random_identity(config.seed),
                    pools=config.pools, input_size=config.image_size,
                    precision=config.precision, runtime=runtime,
                    augmentation=augmentation, max_pixels=config.max_pixels)
        return draft.with_weights(resolve_weights(draft.spec, config.weights, seed=config.seed))

    def with_weights(self, weights: ResolvedWeights) -> Recipe:
        return dataclasses.replace(self, weights=weights.identity, weights_sha256=weights.sha256,
                                   weights_path=weights.path)

    def to_lineage(self, pool: str, *, versions: Mapping[str, str] | None = None) -> Lineage:
        """The lineage of this recipe's ``pool`` table; ``versions`` default to this machine's."""
        if pool not in self.pools:
            raise ValueError(f"pool {pool!r} is not among this recipe's pools {self.pools}.")
        if versions is None:
            versions = library_versions(self.precision, self.augmentation is not None)
        return Lineage(
            backbone=self.backbone, weights=self.weights, pool=pool,
            input_size=(self.input_size, self.input_size), preprocessing=self.preprocessing,
            weights_sha256=self.weights_sha256,
            augmentation=self.augmentation.to_dict() if self.augmentation else None,
            library_versions=versions, precision=self.precision, runtime=self.runtime,
            max_pixels=None if self.max_pixels == DEFAULT_MAX_PIXELS else self.max_pixels)

    def lineages(self) -> dict[str, Lineage]:
        """``{pool: lineage}`` for every pool."""
        versions = library_versions(self.precision, self.augmentation is not None)
        return {pool: self.to_lineage(pool, versions=versions) for pool in self.pools}

    # -- lineage -> recipe -> engine --------------------------------------------------

    @classmethod
    def from_lineage(cls, lineage: Lineage) -> Recipe:
        """The recipe that computed ``lineage``'s table (its one pool); weights not resolved.

        Its runtime is the lineage's where that runs here, else this machine's default.
        """
        height, width = lineage.input_size
        if height != width:
            raise LineageMismatchError(
                f"Table {lineage.key} has a non-square input {height}x{width}.")
        spec = get_spec(lineage.backbone)
        return cls(
            backbone=lineage.backbone, weights=lineage.weights,
            weights_sha256=lineage.weights_sha256, pools=(lineage.pool,), input_size=height,
            preprocessing=lineage.preprocessing, interpolation=spec.interpolation,
            precision=lineage.precision,
            runtime=usable_runtime(lineage.runtime, lineage.backbone, lineage.precision),
            augmentation=Augmentation.from_dict(lineage.augmentation)
            if lineage.augmentation else None,
            max_pixels=lineage.max_pixels or DEFAULT_MAX_PIXELS)

    def with_weights_file(self, weights_path: str | None = None) -> Recipe:
        """This recipe with its weights file found and checked against ``weights_sha256``.

        ``weights_path`` is needed for ``file:<name>`` weights; ``imagenet``
        uses Keras' cache unless it is given; random weights need none.
        """
        if random_seed(self.weights) is not None:
            return self
        if weights_path is None and self.weights != "imagenet":
            raise LineageMismatchError(
                f"Table {self._name()} was computed with weights {self.weights!r}; pass that "
                f"file (weights_path= / --weights PATH) to compute features for new images.")
        resolved = resolve_weights(self.spec, weights_path or "imagenet")
        if resolved.sha256 != self.weights_sha256:
            raise LineageMismatchError(
                f"Weights {resolved.path} have SHA-256 {resolved.sha256[:12]}..., but table "
                f"{self._name()} was computed with {str(self.weights_sha256)[:12]}...; its "
                f"features would not be comparable.")
        return dataclasses.replace(self, weights_path=resolved.path)

    def engine_settings(self, batch_size: int = 32, cache_dir=None) -> EngineSettings:
        """What the engine (and each worker process) needs to compute these features.

        ``cache_dir`` is where the runtime may keep converted models
        (``store.paths.openvino_cache``); None converts in memory.
        """
        if self.weights_path is None and random_seed(self.weights) is None:
            raise LineageMismatchError(
                f"Weights {self.weights!r} are not resolved to a file; call with_weights_file.")
        aug = self.augmentation
        return EngineSettings(
            backbone=self.backbone, input_size=self.input_size, weights_path=self.weights_path,
            seed=self.weights_seed, pools=self.pools, precision=self.precision,
            batch_size=batch_size, runtime=self.runtime, weights_sha256=self.weights_sha256,
            cache_dir=None if cache_dir is None else str(cache_dir),
            recipe=ViewRecipe(size=self.input_size, preprocessing=self.preprocessing,
                              interpolation=self.interpolation, max_pixels=self.max_pixels,
                              augment_preset=aug.preset if aug else None,
                              seed=aug.seed if aug else 0))

    def _name(self) -> str:
        return self.to_lineage(self.pools[0], versions={}).name


def _one_of(name, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}.")


def library_versions(precision: str = DEFAULT_PRECISION, augment: bool = False) -> dict[str, str]:
    """Versions of what computes the features: Keras, its backend, decoding libraries.

    Read from package metadata, so the parent of worker processes never has to
    import a backend just to name it.
    """
    backend = keras_backend()
    packages = {"tensorflow": ("tensorflow", "tensorflow-cpu"), "jax": ("jax", "jaxlib"),
                "torch": ("torch",)}.get(backend, ())
    versions = {"keras": _version("keras"), "backend": backend,
                "numpy": _version("numpy"), "pillow": _version("pillow")}
    for name in packages:
        if _version(name):
            versions[name.replace("-cpu", "")] = _version(name)
    if augment:
        versions["scipy"] = _version("scipy")
    if precision != DEFAULT_PRECISION:
        # Where tables made before Lineage.precision existed hashed it; written still,
        # so a bfloat16 table keeps its key (see featurestore.lineage.Lineage.to_json).
        versions["compute_dtype"] = precision
    return versions


def keras_backend() -> str:
    """The backend Keras uses or will use: as Keras decides, without importing it.

    Keras reads ``KERAS_BACKEND``, then ``backend`` in ``$KERAS_HOME/keras.json``
    (``~/.keras``), and defaults to TensorFlow.
    """
    if "keras" in sys.modules:
        return sys.modules["keras"].config.backend()
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    config = Path(keras_cache_dir()) / "keras.json"
    try:
        return json.loads(config.read_text()).get("backend", "tensorflow")
    except (OSError, ValueError):
        return "tensorflow"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
