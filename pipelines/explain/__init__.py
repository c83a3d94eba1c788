"""``featurestore explain``: heatmaps of where a model looks, as overlay PNGs.

* :mod:`~pipelines.explain.run`: the command and :func:`run_explain`;
* :mod:`~pipelines.explain.heatmaps`: exact CAM for linear heads, Grad-CAM otherwise.
"""

from pipelines._exports import lazy_exports

_EXPORTS = {
    "ExplainConfig": "run",
    "ExplainResult": "run",
    "run_explain": "run",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
