"""Resolve and load backbone weights: ``imagenet``, ``none`` or a local file.

Resolution happens before any image is read, so a missing download or a wrong
file fails the run in seconds, not after an hour of decoding:

* ``imagenet`` goes through ``keras.utils.get_file`` with Keras' own file name,
  URL and MD5, i.e. the same cache (``$KERAS_HOME/models`` or
  ``~/.keras/models``) that ``keras.applications`` fills. Offline and not
  cached, the error names the URL to fetch elsewhere and ``--weights PATH``.
* ``none`` is seeded random initialisation (tests and smoke runs).
* anything else is a path to a Keras weights file (``.weights.h5`` or legacy
  ``.h5``). Before loading, the file's arrays are matched against the model's
  by shape, so a file of another architecture (or one that still carries the
  classification top) fails with a message naming the file and the backbone.

The SHA-256 of the file becomes part of the feature table's lineage.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import socket
import warnings

from featurestore._io import hash_file
from featurestore.errors import FeatureStoreError

#: Seconds to wait for the weights server before declaring the machine offline.
DOWNLOAD_TIMEOUT_S = 30
#: Keras's own cache folder for downloaded weights (``~/.keras/models``); not a store folder.
KERAS_CACHE_SUBDIR = "models"
#: Identity of seeded random weights is ``random:<seed>``.
_RANDOM = "random:"


class WeightsError(FeatureStoreError, ValueError):
    """Weights cannot be found, downloaded, or do not fit the backbone."""


@dataclasses.dataclass(frozen=True)
class ResolvedWeights:
    """Where a backbone's weights come from, as recorded in lineage."""

    identity: str
    """``"imagenet"``, ``"random:<seed>"`` or ``"file:<basename>"``."""
    path: str | None
    """Local weights file to load, or None for random initialisation."""
    sha256: str | None
    """Hex SHA-256 of ``path``; None for random initialisation."""


def resolve_weights(spec, weights: str, *, seed: int = 0) -> ResolvedWeights:
    """Turn the ``--weights`` value into a local file and its identity.

    ``spec`` is a ``pipelines.backbones.BackboneSpec``. Raises ``WeightsError``
    when ImageNet weights are neither cached nor downloadable, or when a path
    does not name a readable ``.h5`` file.
    """
    if weights == "none":
        return ResolvedWeights(identity=random_identity(seed), path=None, sha256=None)
    if weights == "imagenet":
        path = _imagenet_file(spec)
        return ResolvedWeights(identity="imagenet", path=path, sha256=hash_file(path))
    path = _check_weights_path(weights)
    return ResolvedWeights(
        identity=f"file:{os.path.basename(path)}", path=path, sha256=hash_file(path)
    )


def random_identity(seed: int) -> str:
    """Weights identity of seeded random initialisation: ``random:<seed>``."""
    return f"{_RANDOM}{int(seed)}"


def random_seed(identity: str) -> int | None:
    """The seed of a ``random:<seed>`` identity; None for any other weights."""
    if not identity.startswith(_RANDOM):
        return None
    try:
        return int(identity[len(_RANDOM):])
    except ValueError:
        raise WeightsError(f"Weights identity {identity!r} is not random:<integer seed>.") from None


def _imagenet_file(spec) -> str:
    if spec.weights_url is None:
        raise WeightsError(
            f"Backbone {spec.name!r} has no ImageNet weights in Keras; "
            f"pass --weights none or --weights PATH."
        )
    cache_dir = keras_cache_dir()
    cache = os.path.join(cache_dir, KERAS_CACHE_SUBDIR, spec.weights_file)
    # The cache hit is checked as get_file checks it (file name and MD5), so a
    # cached run never imports Keras (and its backend) in this process.
    if os.path.isfile(cache) and hash_file(cache, "md5") == spec.weights_md5:
        return cache
    import keras

    previous = socket.getdefaulttimeout()
    # get_file has no timeout of its own; a firewalled host would hang forever.
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return keras.utils.get_file(
            spec.weights_file, spec.weights_url,
            cache_dir=cache_dir, cache_subdir=KERAS_CACHE_SUBDIR, file_hash=spec.weights_md5,
        )
    except Exception as err:  # get_file raises bare Exception on fetch failure
        raise WeightsError(
            f"ImageNet weights for backbone {spec.name!r} are not in the Keras "
            f"cache ({cache}) and could not be downloaded from {spec.weights_url} "
            f"({type(err).__name__}: {err}). Download that file on a machine with "
            f"internet access and pass it with --weights PATH (weights=PATH in "
            f"Python), or copy it to {cache}."
        ) from err
    finally:
        socket.setdefaulttimeout(previous)


def keras_cache_dir() -> str:
    """Keras' cache root, ``$KERAS_HOME`` or ``~/.keras``, read at call time.

    Keras reads ``KERAS_HOME`` once at import; reading it here as well lets a
    caller (or a test) point one run at another cache.
    """
    return os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")


def _check_weights_path(weights: str) -> str:
    allowed = "'imagenet', 'none' or a path to a Keras weights file (.weights.h5 or .h5)"
    if not weights.endswith(".h5"):
        raise WeightsError(f"weights must be {allowed}; got {weights!r}.")
    if not os.path.isfile(weights):
        raise WeightsError(f"weights must be {allowed}; got {weights!r}, which does not exist.")
    if not os.access(weights, os.R_OK):
        raise WeightsError(f"Weights file {weights!r} is not readable (permission denied).")
    return os.path.abspath(weights)


def load_checked(model, path: str, backbone: str) -> None:
    """Load ``path`` into ``model`` after checking that its arrays fit.

    Both Keras 3 ``.weights.h5`` and legacy ``.h5`` files store one HDF5
    dataset per variable, so the multiset of array shapes must equal the
    model's. Comparing shapes first gives one clear message instead of Keras'
    per-layer errors (or, for some mismatches, silently skipped layers).
    """
    file_shapes = _h5_array_shapes(path)
    model_shapes = collections.Counter(tuple(w.shape) for w in model.weights)
    if file_shapes != model_shapes:
        raise WeightsError(_mismatch_message(path, backbone, file_shapes, model_shapes))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Keras warns per skipped container
            model.load_weights(path)
    except (ValueError, KeyError, OSError) as err:
        raise WeightsError(
            f"Weights file {path!r} does not fit backbone {backbone!r}: {err}"
        ) from err


def _h5_array_shapes(path: str) -> collections.Counter:
    import h5py

    shapes = collections.Counter()

    def visit(_name, obj):
        if isinstance(obj, h5py.Dataset):
            shapes[tuple(obj.shape)] += 1

    try:
        with h5py.File(path, "r") as f:
            f.visititems(visit)
    except OSError as err:
        raise WeightsError(f"Weights file {path!r} is not a readable HDF5 file: {err}") from err
    return shapes


def _mismatch_message(path, backbone, file_shapes, model_shapes) -> str:
    extra = file_shapes - model_shapes
    missing = model_shapes - file_shapes
    head = (
        f"Weights file {path!r} does not fit backbone {backbone!r}: it holds "
        f"{sum(file_shapes.values())} arrays, the model without top has "
        f"{sum(model_shapes.values())}"
    )
    if not missing and extra:
        return (
            f"{head}; the extra arrays {sorted(extra)[:3]} look like a classification "
            f"top. Pass a no-top file (include_top=False)."
        )
    return (
        f"{head}; shapes missing from the file include {sorted(missing)[:3]}. "
        f"Pass weights saved from the same architecture with include_top=False."
    )
