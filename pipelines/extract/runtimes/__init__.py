"""What runs the backbone (``extract --runtime``): a registry, like the backbones'.

A runtime is one module in this package plus one line in :data:`RUNTIMES`.
Each module defines:

* ``STREAMS``: whether it runs one inference stream per core itself (then
  ``extract`` runs one process, not one per core);
* ``unavailable() -> str | None``: why it cannot run on this machine (None: it can);
* ``refuses(backbone, precision) -> str | None``: why it will not run that recipe;
* ``build(settings) -> predict``: ``predict(pixels, n)`` maps a ``(batch, h, w, 3)``
  float32 batch whose first ``n`` views are real (the rest padding) to one
  ``(n, feature_dim)`` array per pooling of ``settings``.

Modules are imported on use, so listing the registry (the CLI's ``--runtime``
choices) imports neither Keras nor OpenVINO.

Both runtimes compute float32 features equal within :data:`TOLERANCE` (max
relative L2 per row, measured on every backbone), so the runtime is recorded
in a table's lineage but is not part of its key: a table begun by one runtime
may be extended by the other.
"""

from __future__ import annotations

import importlib
import os

#: ``name -> module`` of every runtime, in ``--runtime`` order.
RUNTIMES = {"keras": "keras", "openvino": "openvino"}
#: Largest relative L2 distance allowed between two runtimes' features of one view.
TOLERANCE = 1e-5
#: Set to a runtime name to override the automatic choice (the test suite pins ``keras``).
RUNTIME_ENV = "FEATURESTORE_RUNTIME"


def list_runtimes() -> list[str]:
    return list(RUNTIMES)


def get_runtime(name: str):
    """The module of runtime ``name``; an unknown name lists the known ones."""
    if name not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}; got {name!r}.")
    return importlib.import_module(f"{__name__}.{RUNTIMES[name]}")


def why_not(name: str, backbone: str, precision: str) -> str | None:
    """Why runtime ``name`` cannot compute ``backbone`` at ``precision`` here (None: it can)."""
    runtime = get_runtime(name)
    return runtime.unavailable() or runtime.refuses(backbone, precision)


def check_runtime(name: str, backbone: str, precision: str) -> str:
    """``name`` when it can run this recipe; else a ValueError saying why."""
    reason = why_not(name, backbone, precision)
    if reason:
        raise ValueError(f"runtime {name!r} cannot run backbone {backbone!r} at {precision}: "
                         f"{reason}")
    return name


def default_runtime(backbone: str, precision: str) -> str:
    """``$FEATURESTORE_RUNTIME`` if set; else ``openvino`` on a CPU-only machine when it is
    installed and runs this recipe; else ``keras`` (always so on an accelerator)."""
    from pipelines.extract.engine import accelerator_present

    if os.environ.get(RUNTIME_ENV):
        return check_runtime(os.environ[RUNTIME_ENV], backbone, precision)
    if not accelerator_present() and why_not("openvino", backbone, precision) is None:
        return "openvino"
    return "keras"


def usable_runtime(name: str, backbone: str, precision: str) -> str:
    """``name`` if it runs here and ``$FEATURESTORE_RUNTIME`` is unset, else the default: the
    runtimes are interchangeable (see :data:`TOLERANCE`), so a table's recorded runtime
    is a preference, not a need."""
    if os.environ.get(RUNTIME_ENV) or why_not(name, backbone, precision) is not None:
        return default_runtime(backbone, precision)
    return name
