"""Lineage: the recipe that computed a feature table, and the key derived from it.

Two tables computed differently (another backbone, weights file, pooling, input
size, preprocessing, augmentation or library version) always get different
keys, so their rows can never land in one table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from featurestore.errors import FeatureStoreError

#: Fields a lineage query may name, and the shorthand order of "a/b/c" queries.
QUERY_FIELDS = ("backbone", "pool", "input_size", "weights", "weights_sha256",
                "preprocessing", "augmentation", "key")
_POSITIONAL = ("backbone", "pool", "input_size")


@dataclass(frozen=True)
class Lineage:
    """Everything that determines the values in a feature table.

    Examples
    --------
    >>> lin = Lineage(backbone="densenet121", weights="random:0", pool="max",
    ...               input_size=(32, 32), preprocessing="torch")
    >>> lin.key.startswith("densenet121-max-32-")
    True
    """

    backbone: str
    """Registry name of the backbone, e.g. ``densenet121``."""
    weights: str
    """Weights identity: ``imagenet``, ``file:<name>`` or ``random:<seed>``."""
    pool: str
    """Reduction of the final feature map: ``max`` or ``avg``."""
    input_size: tuple[int, int]
    """Height and width the images are resized to before the backbone."""
    preprocessing: str
    """Name of the pixel preprocessing (``torch``, ``caffe``, ``tf``, ...)."""
    weights_sha256: str | None = None
    """SHA-256 of the weights file; ``None`` only for random weights."""
    augmentation: Mapping[str, Any] | None = None
    """Augmentation spec (preset, views, seed, splits); ``None`` when raw only."""
    library_versions: Mapping[str, str] = field(default_factory=dict)
    """Versions of the libraries that computed the features."""

    def __post_init__(self):
        size = self.input_size
        if isinstance(size, int):
            size = (size, size)
        object.__setattr__(self, "input_size", tuple(int(s) for s in size))
        if len(self.input_size) != 2:
            raise FeatureStoreError(
                f"Lineage input_size must be (height, width); got {self.input_size!r}.")
        for name in ("backbone", "weights", "pool", "preprocessing"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise FeatureStoreError(
                    f"Lineage field {name!r} must be a non-empty string; "
                    f"got {getattr(self, name)!r}.")
        if self.augmentation is not None:
            object.__setattr__(self, "augmentation", dict(self.augmentation))
        object.__setattr__(self, "library_versions",
                           {str(k): str(v) for k, v in dict(self.library_versions).items()})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (``input_size`` as a list)."""
        d = dataclasses.asdict(self)
        d["input_size"] = list(self.input_size)
        return d

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace, so equal lineages hash equal."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Lineage:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise FeatureStoreError(
                f"Unknown lineage fields {sorted(unknown)}; expected a subset of {sorted(names)}.")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> Lineage:
        return cls.from_dict(json.loads(text))

    @property
    def key(self) -> str:
        """Readable, unique table key: ``<backbone>-<pool>-<size>-<12 hex of sha256>``."""
        digest = hashlib.sha256(self.to_json().encode()).hexdigest()[:12]
        h, w = self.input_size
        size = str(h) if h == w else f"{h}x{w}"
        return f"{self.backbone}-{self.pool}-{size}-{digest}"

    def matches(self, query: Mapping[str, Any]) -> bool:
        """Whether every field named in ``query`` (see :func:`parse_query`) has that value."""
        for name, wanted in query.items():
            if name == "key":
                if not self.key.startswith(str(wanted)):
                    return False
            elif name == "input_size":
                if self.input_size != _parse_size(wanted):
                    return False
            elif name == "augmentation":
                preset = (self.augmentation or {}).get("preset", "none")
                if str(wanted) not in (str(preset), "any"):
                    return False
            elif str(getattr(self, name)) != str(wanted):
                return False
        return True

    def diff(self, other: Lineage) -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ, as ``{field: (self_value, other_value)}``."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


def parse_query(query: str | Mapping[str, Any]) -> dict[str, Any]:
    """Turn a table query into a ``{field: value}`` dict.

    Accepted forms: a mapping; ``"backbone=densenet121,pool=max"``;
    ``"densenet121/max"`` or ``"densenet121/max/224"`` (backbone/pool/input size);
    or a table key or key prefix such as ``"densenet121-max-224-1a2b"``.
    """
    if isinstance(query, Mapping):
        items = dict(query)
    else:
        text = str(query).strip()
        if not text:
            raise FeatureStoreError("Empty table query; give e.g. 'densenet121/max' or a key.")
        if "=" in text:
            items = {}
            for part in text.split(","):
                name, sep, value = part.partition("=")
                if not sep or not name.strip():
                    raise FeatureStoreError(
                        f"Cannot parse {part!r} in table query {text!r}; expected field=value.")
                items[name.strip()] = value.strip()
        elif "/" in text:
            values = [v for v in text.split("/")]
            if len(values) > len(_POSITIONAL) or not all(values):
                raise FeatureStoreError(
                    f"Cannot parse table query {text!r}; expected backbone/pool[/input_size].")
            items = dict(zip(_POSITIONAL, values))
        else:
            items = {"key": text}
    unknown = set(items) - set(QUERY_FIELDS)
    if unknown:
        raise FeatureStoreError(
            f"Unknown field(s) {sorted(unknown)} in table query; "
            f"allowed: {', '.join(QUERY_FIELDS)}.")
    return items


def _parse_size(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)):
        return tuple(int(v) for v in value)
    h, _, w = str(value).lower().partition("x")
    return (int(h), int(w or h))
