"""Similar images from stored features: :mod:`~pipelines.similar.index` (build an index),
:mod:`~pipelines.similar.search` (``featurestore search``), :mod:`~pipelines.similar.evaluate`
(``featurestore eval-search``: precision@k) and :mod:`~pipelines.similar.near_duplicates`."""
