"""New images into a living store: :mod:`~pipelines.ingest.run` (``featurestore ingest``),
:mod:`~pipelines.ingest.session` (what the CLI and the HTTP server share),
:mod:`~pipelines.ingest.tables` (a new image's row in a table, given its lineage),
:mod:`~pipelines.ingest.scores` (``featurestore scores``) and
:mod:`~pipelines.ingest.labels` (``featurestore label``: labels for inbox images from a file)."""

from pipelines._exports import lazy_exports

_EXPORTS = {
    "IngestConfig": "run",
    "run_ingest": "run",
    "LabelConfig": "labels",
    "run_label": "labels",
    "IngestSession": "session",
    "append_to_table": "tables",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
