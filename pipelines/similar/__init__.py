"""Similar images from stored features: :mod:`~pipelines.similar.index` (build an index),
:mod:`~pipelines.similar.search` (``featurestore search``), :mod:`~pipelines.similar.evaluate`
(``featurestore eval-search``: precision@k) and :mod:`~pipelines.similar.near_duplicates`."""

from pipelines._exports import lazy_exports

_EXPORTS = {
    "SearchConfig": "search",
    "run_search": "search",
    "EvalSearchConfig": "evaluate",
    "run_eval_search": "evaluate",
    "IndexConfig": "index",
    "run_index": "index",
    "NearDuplicatesConfig": "near_duplicates",
    "run_near_duplicates": "near_duplicates",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
