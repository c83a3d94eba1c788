"""Label audit (``featurestore audit-labels``): score, rank, show and review suspects.

:mod:`~pipelines.audit.scores` (out-of-sample probabilities), :mod:`~pipelines.audit.gallery`
(each suspect beside its neighbours), :mod:`~pipelines.audit.review` (decisions into a view),
:mod:`~pipelines.audit.run` (``run_audit_labels`` and the CLI command).
"""

from pipelines._exports import lazy_exports

_EXPORTS = {
    "AuditLabelsConfig": "run",
    "run_audit_labels": "run",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
