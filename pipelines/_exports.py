"""Stage folders export their ``<Verb>Config`` and ``run_<verb>`` lazily.

``from pipelines.extract import ExtractConfig, run_extract`` imports
``pipelines.extract.run`` only then, so importing one module of a stage (the
loader, say) never pulls in the whole stage, and stages can import each
other's modules without import cycles through their ``__init__``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` resolving ``name`` from submodule ``exports[name]``."""

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    return __getattr__
