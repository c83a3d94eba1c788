"""The store over HTTP: :mod:`~pipelines.serve.run` (``featurestore serve``),
:mod:`~pipelines.serve.app` (``create_app``), :mod:`~pipelines.serve.service` (what the
endpoints do) and :mod:`~pipelines.serve.uploads` (streamed, checked uploads)."""

from pipelines._exports import lazy_exports

_EXPORTS = {
    "ServeConfig": "run",
    "run_serve": "run",
    "create_app": "app",
    "ServeSettings": "app",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
