"""The static HTML report (``featurestore report``).

:mod:`~pipelines.report.data` gathers, :mod:`~pipelines.report.compare` pairs rows,
:mod:`~pipelines.report.figures` and :mod:`~pipelines.report.map` draw,
:mod:`~pipelines.report.sections` builds template contexts, and
:mod:`~pipelines.report.run` lays out ``templates/report.html``.
"""

from pipelines._exports import lazy_exports

_EXPORTS = {
    "ReportConfig": "run",
    "run_report": "run",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
