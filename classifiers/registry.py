"""Registry of classifier heads, in the style of timm's model registry.

A head is added by one decorated estimator class in ``classifiers/heads/`` and
one import line in ``classifiers/heads/__init__.py``::

    @register_head("logreg", search_space=logreg_space, test_params={"max_iter": 50})
    class LogRegHead(HeadBase):
        ...

``create_head(name, **params)`` is the one factory; an unknown name fails with
the list of known ones. The CLI's ``--heads`` choices, the docs table and the
conformance suite (``tests/test_heads.py``) all loop over :func:`list_heads`, so
a new head is tested the moment it is registered.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from classifiers.errors import ClassifierError

#: ``search_space(trial) -> dict`` of constructor parameters for one Optuna trial.
SearchSpace = Callable[[Any], dict[str, Any]]


class UnknownHeadError(ClassifierError, ValueError):
    """The head name is not in the registry; the message lists the known names."""


@dataclass(frozen=True)
class HeadSpec:
    """Everything the search and the tests need to know about one head."""

    name: str
    """Registry key, the lowercase name the CLI accepts (``logreg``)."""
    cls: type
    """The scikit-learn compatible estimator class."""
    search_space: SearchSpace
    """Plain function of an Optuna trial returning constructor parameters."""
    description: str = ""
    """One line for ``--help`` and the docs table."""
    test_params: Mapping[str, Any] = field(default_factory=dict)
    """Small, fast settings for the conformance suite (tiny epochs, few rounds)."""
    expected_failed_checks: Mapping[str, str] = field(default_factory=dict)
    """scikit-learn estimator checks this head fails on purpose: ``{check: reason}``."""
    uses_keras: bool = False
    """Whether the search must clear the Keras session after every trial."""


_REGISTRY: dict[str, HeadSpec] = {}


def register_head(name: str, *, search_space: SearchSpace, description: str = "",
                  test_params: Mapping[str, Any] | None = None,
                  expected_failed_checks: Mapping[str, str] | None = None,
                  uses_keras: bool = False) -> Callable[[type], type]:
    """Class decorator adding an estimator class to the registry under ``name``."""

    def decorate(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise ClassifierError(
                f"Head name {name!r} is already registered by {_REGISTRY[name].cls.__name__}.")
        _REGISTRY[name] = HeadSpec(name, cls, search_space, description or _first_line(cls),
                                   dict(test_params or {}), dict(expected_failed_checks or {}),
                                   uses_keras)
        cls.head_name = name
        return cls

    return decorate


def _first_line(cls: type) -> str:
    return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else cls.__name__


def _load_builtin_heads() -> None:
    # Importing the package runs every @register_head; done lazily so that
    # ``import classifiers.registry`` stays cheap and free of import cycles.
    import classifiers.heads  # noqa: F401


def list_heads() -> list[str]:
    """Registered head names, sorted."""
    _load_builtin_heads()
    return sorted(_REGISTRY)


def get_head_spec(name: str) -> HeadSpec:
    """The :class:`HeadSpec` of ``name``; raises :class:`UnknownHeadError` listing known names."""
    _load_builtin_heads()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownHeadError(
            f"Unknown head {name!r}. Available: {', '.join(sorted(_REGISTRY))}.") from None


def create_head(name: str, **params: Any):
    """A new, unfitted estimator of head ``name`` with ``params`` set."""
    spec = get_head_spec(name)
    try:
        return spec.cls(**params)
    except TypeError as err:
        raise ClassifierError(
            f"Bad parameters for head {name!r}: {err}. Allowed: "
            f"{', '.join(sorted(spec.cls().get_params()))}.") from err


def heads_table() -> str:
    """A Markdown table of the registered heads (name, estimator, description) for the docs."""
    lines = ["| head | estimator | description |", "|---|---|---|"]
    for name in list_heads():
        spec = _REGISTRY[name]
        lines.append(f"| `{name}` | `{spec.cls.__module__}.{spec.cls.__name__}` | "
                     f"{spec.description} |")
    return "\n".join(lines)
