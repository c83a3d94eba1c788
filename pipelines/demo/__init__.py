"""``featurestore demo``: every stage end to end on scikit-learn's digit scans
(:mod:`~pipelines.demo.data` writes them, :mod:`~pipelines.demo.run` runs the stages)."""

from pipelines._exports import lazy_exports

_EXPORTS = {
    "DemoConfig": "run",
    "run_demo": "run",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
