"""Extraction: images in, feature tables out (``featurestore extract``).

Reader -> mapper -> writer, one module each:

* :mod:`~pipelines.extract.plan`: the manifest's images minus the rows already stored;
* :mod:`~pipelines.extract.images`, :mod:`~pipelines.extract.augment`,
  :mod:`~pipelines.extract.loader`: decode, augment and batch on a thread pool;
* :mod:`~pipelines.extract.engine`: the backbone over batches, in-process or pinned workers;
* :mod:`~pipelines.extract.errors`: the files that failed, and why;
* :mod:`~pipelines.extract.recipe`: a table's settings to its lineage and back (``Recipe``);
* :mod:`~pipelines.extract.featurize`: features of new files with a table's own recipe;
* :mod:`~pipelines.extract.run`: ``run_extract(ExtractConfig(...))`` and the CLI command.
"""

from pipelines._exports import lazy_exports

_EXPORTS = {
    "ExtractConfig": "run",
    "ExtractResult": "run",
    "run_extract": "run",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
