"""Lineage: the recipe that computed a feature table, and the key derived from it.

Two tables computed differently (another backbone, weights file, pooling, input
size, preprocessing, augmentation, precision or library version) always
get different keys, so their rows can never land in one table.

The key hashes :meth:`Lineage.to_json`, which leaves out fields that still hold
the value every table had before the field existed (``precision="float32"``),
so adding a field never renames an existing table. ``runtime`` is recorded but
never hashed nor compared: the runtimes compute the same float32 features
(within ``pipelines.extract.runtimes.TOLERANCE``), so either may extend a table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from featurestore.errors import FeatureStoreError

#: Fields a lineage query may name, and the shorthand order of "a/b/c" queries.
QUERY_FIELDS = ("backbone", "pool", "input_size", "weights", "weights_sha256",
                "preprocessing", "augmentation", "precision", "runtime", "embedding", "key")
_POSITIONAL = ("backbone", "pool", "input_size")

#: The one spelling of "this table has no augmented views" (``augmentation=none``).
#: Not ``raw``: every table has raw rows (``aug_id == 0``, the reader's ``aug="raw"``),
#: augmented tables too, and ``none`` is what queries have always accepted.
NO_AUGMENTATION = "none"
DEFAULT_PRECISION = "float32"
DEFAULT_RUNTIME = "keras"
#: Fields left out of the hashed form while they hold these values: tables written
#: before the field existed computed exactly that, and keep their keys.
_HASHED_UNLESS = {"precision": DEFAULT_PRECISION}
#: Recorded in lineage.json, never hashed nor compared.
_UNHASHED = ("max_pixels", "runtime")
#: What a derived table's ``derived`` field must hold (see :func:`derived_spec`).
DERIVED_FIELDS = ("parent_key", "projection", "weights_sha256")
#: Where tables written before ``precision`` was a field recorded a non-float32 one.
_OLD_PRECISION_KEY = "compute_dtype"


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
    precision: str = DEFAULT_PRECISION
    """Compute precision of the backbone: ``float32`` or ``bfloat16``. Tables written
    before this field existed record a non-float32 one as ``library_versions["compute_dtype"]``,
    which is read as the precision (and, being hashed already, keeps their key)."""
    runtime: str = field(default=DEFAULT_RUNTIME, compare=False)
    """What ran the backbone when the table was created: ``keras`` (the Keras backend's
    graph) or ``openvino``. Never hashed nor compared: the runtimes' float32 features
    agree within 1e-5 relative L2, so a table may be extended by either."""
    derived: Mapping[str, Any] | None = None
    """For a table computed from another table's rows (a learned embedding): the parent
    table's key, the projection's spec (``dim`` among it) and the SHA-256 of its weights.
    ``None`` for a table computed from images. The other fields are the parent's."""
    max_pixels: int | None = field(default=None, compare=False)
    """Largest image (in pixels) the run that created the table decoded; ``None``: the
    default. A limit on which files are read, not on their features: never hashed,
    never compared, so raising it for one huge scan does not start another table."""

    def __post_init__(self):
        size = self.input_size
        if isinstance(size, int):
            size = (size, size)
        object.__setattr__(self, "input_size", tuple(int(s) for s in size))
        if len(self.input_size) != 2:
            raise FeatureStoreError(
                f"Lineage input_size must be (height, width); got {self.input_size!r}.")
        for name in ("backbone", "weights", "pool", "preprocessing", "precision", "runtime"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise FeatureStoreError(
                    f"Lineage field {name!r} must be a non-empty string; "
                    f"got {getattr(self, name)!r}.")
        if self.augmentation is not None:
            object.__setattr__(self, "augmentation", dict(self.augmentation))
        object.__setattr__(self, "library_versions",
                           {str(k): str(v) for k, v in dict(self.library_versions).items()})
        self._adopt_old_precision()
        if self.derived is not None:
            object.__setattr__(self, "derived", _check_derived(self.derived))
        if self.max_pixels is not None:
            object.__setattr__(self, "max_pixels", int(self.max_pixels))

    def _adopt_old_precision(self) -> None:
        recorded = self.library_versions.get(_OLD_PRECISION_KEY)
        if recorded is None or recorded == self.precision:
            return
        if self.precision != DEFAULT_PRECISION:
            raise FeatureStoreError(
                f"Lineage precision {self.precision!r} contradicts library_versions"
                f"[{_OLD_PRECISION_KEY!r}] = {recorded!r}.")
        object.__setattr__(self, "precision", recorded)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (``input_size`` as a list); what lineage.json holds.

        ``max_pixels`` and ``derived`` appear only when set (so neither changes the
        key, nor the lineage.json, of a table computed from images).
        """
        d = dataclasses.asdict(self)
        d["input_size"] = list(self.input_size)
        for name in ("max_pixels", "derived"):
            if d[name] is None:
                del d[name]
        return d

    def to_json(self) -> str:
        """Canonical JSON of the hashed fields: sorted keys, no whitespace.

        Left out: ``max_pixels`` and ``runtime``, and ``precision`` while it holds
        its default (or while ``library_versions`` records it), so that a table's
        key is the one it had before these were fields.
        """
        d = self.to_dict()
        for name in _UNHASHED:
            d.pop(name, None)
        for name, default in _HASHED_UNLESS.items():
            if d[name] == default:
                del d[name]
        if d.get("precision") == self.library_versions.get(_OLD_PRECISION_KEY):
            d.pop("precision", None)
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

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
    def augmentation_preset(self) -> str:
        """The augmentation preset's name, or :data:`NO_AUGMENTATION`."""
        if not self.augmentation:
            return NO_AUGMENTATION
        return str(self.augmentation.get("preset", NO_AUGMENTATION))

    @property
    def name(self) -> str:
        """How a table is shown: ``densenet121/max/224``, plus ``+<preset>`` when augmented
        and ``@<precision>`` when not float32; also a query that matches the table.

        Not unique (weights, views, seed and runtime are left out): the key is. As a
        query, a name without ``+<preset>`` also matches the augmented tables of that
        recipe, as ``densenet121/max`` always has.
        """
        h, w = self.input_size
        name = f"{self.backbone}/{self.pool}/{h if h == w else f'{h}x{w}'}"
        if self.augmentation:
            name += f"+{self.augmentation_preset}"
        if self.derived:
            name += f"+{self.embedding}"
        if self.precision != DEFAULT_PRECISION:
            name += f"@{self.precision}"
        return name

    @property
    def embedding(self) -> str:
        """``emb<dim>`` for a derived (embedding) table, else ``none``."""
        return f"emb{self.derived['projection']['dim']}" if self.derived else NO_AUGMENTATION

    @property
    def key(self) -> str:
        """Readable, unique table key: ``<backbone>-<pool>-<size>-<12 hex of sha256>``; a
        derived table's has ``-emb<dim>`` after the size."""
        digest = hashlib.sha256(self.to_json().encode()).hexdigest()[:12]
        h, w = self.input_size
        size = str(h) if h == w else f"{h}x{w}"
        if self.derived:
            size += f"-{self.embedding}"
        return f"{self.backbone}-{self.pool}-{size}-{digest}"

    def matches(self, query: Mapping[str, Any]) -> bool:
        """Whether every field named in ``query`` (see :func:`parse_query`) has that value.

        A derived table matches only queries that name it (``embedding=...`` or its key),
        so adding an embedding never makes its parent's name ambiguous.
        """
        if self.derived and not {"embedding", "key"} & set(query):
            return False
        for name, wanted in query.items():
            if name == "key":
                if not self.key.startswith(str(wanted)):
                    return False
            elif name == "input_size":
                if self.input_size != _parse_size(wanted):
                    return False
            elif name == "augmentation":
                if str(wanted) not in (self.augmentation_preset, "any"):
                    return False
            elif name == "embedding":
                if str(wanted) not in (self.embedding, "any"):
                    return False
            elif str(getattr(self, name)) != str(wanted):
                return False
        return True

    def diff(self, other: Lineage) -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ, as ``{field: (self_value, other_value)}``."""
        a, b = self.to_dict(), other.to_dict()
        for name in _UNHASHED:
            a.pop(name, None)
            b.pop(name, None)
        return {k: (a.get(k), b.get(k)) for k in {**a, **b} if a.get(k) != b.get(k)}


def parse_query(query: str | Mapping[str, Any]) -> dict[str, Any]:
    """Turn a table query into a ``{field: value}`` dict.

    Accepted forms: a mapping; ``"backbone=densenet121,pool=max"``;
    ``"densenet121/max"`` or ``"densenet121/max/224"`` (backbone/pool/input size),
    optionally followed by ``+<preset>`` and ``@<precision>`` as in
    :attr:`Lineage.name`; or a table key or key prefix such as
    ``"densenet121-max-224-1a2b"``.
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
            items = _parse_name(text)
        else:
            items = {"key": text}
    unknown = set(items) - set(QUERY_FIELDS)
    if unknown:
        raise FeatureStoreError(
            f"Unknown field(s) {sorted(unknown)} in table query; "
            f"allowed: {', '.join(QUERY_FIELDS)}.")
    return items


def _parse_name(text: str) -> dict[str, str]:
    """``backbone/pool[/input_size][+preset][+emb<dim>][@precision]`` -> query fields."""
    rest, at, precision = text.partition("@")
    rest, *extras = rest.split("+")
    embedding = [e for e in extras if _EMBEDDING.fullmatch(e)]
    extras = [e for e in extras if not _EMBEDDING.fullmatch(e)]
    plus, preset = bool(extras), "+".join(extras)
    values = rest.split("/")
    if len(values) > len(_POSITIONAL) or not all(values) or (at and not precision) \
            or (plus and not preset):
        raise FeatureStoreError(
            f"Cannot parse table query {text!r}; expected "
            f"backbone/pool[/input_size][+augmentation][+emb<dim>][@precision].")
    items = dict(zip(_POSITIONAL, values))
    if embedding:
        items["embedding"] = embedding[-1]
    if plus:
        items["augmentation"] = preset
    if at:
        items["precision"] = precision
    return items


_EMBEDDING = re.compile(r"emb\d+")


def derived_spec(parent: Lineage, projection: Mapping[str, Any], weights_sha256: str) -> Lineage:
    """The lineage of the table of ``parent``'s rows mapped by a projection.

    ``projection`` is JSON-ready and names its output width as ``dim``;
    ``weights_sha256`` is that of the projection's saved weights. Derived tables
    are not derived again: the parent must be computed from images.
    """
    if parent.derived:
        raise FeatureStoreError(f"Table {parent.key} is itself derived (from "
                                f"{parent.derived['parent_key']}); derive from an image table.")
    derived = {"parent_key": parent.key, "projection": dict(projection),
               "weights_sha256": weights_sha256}
    return dataclasses.replace(parent, derived=derived)


def _check_derived(derived: Mapping[str, Any]) -> dict[str, Any]:
    derived = dict(derived)
    dim = dict(derived.get("projection") or {}).get("dim")
    if sorted(derived) != sorted(DERIVED_FIELDS) or not isinstance(dim, int) or dim < 1:
        raise FeatureStoreError(
            f"Lineage field 'derived' must hold {', '.join(DERIVED_FIELDS)} with an integer "
            f"projection dim; got {derived!r}.")
    return derived


def _parse_size(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)):
        return tuple(int(v) for v in value)
    h, _, w = str(value).lower().partition("x")
    return (int(h), int(w or h))
