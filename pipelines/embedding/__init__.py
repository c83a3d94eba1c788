"""Learned embeddings on stored features, kept as derived tables.

* :mod:`~pipelines.embedding.run`: ``featurestore fit-embedding`` (train a projection on a
  table's rows, write every row projected as a derived table, calibrate its verifier);
* :mod:`~pipelines.embedding.derived`: derived tables: the projection file, checked on load,
  and :func:`~pipelines.embedding.derived.extend_derived` (project new parent rows);
* :mod:`~pipelines.embedding.verify`: ``featurestore verify`` (are two images of one class?).
"""

from pipelines._exports import lazy_exports

_EXPORTS = {
    "FitEmbeddingConfig": "run",
    "run_fit_embedding": "run",
    "VerifyConfig": "verify",
    "run_verify": "verify",
    "extend_derived": "derived",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
