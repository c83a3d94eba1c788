"""Features of new image files, computed with exactly a table's recipe.

Used where an image outside the store must be compared with, or scored
against, stored features (``featurestore search`` and ``featurestore predict``):
the backbone, weights, input size, preprocessing, pooling, precision and
file-size limit all come from the table's :class:`~featurestore.Lineage`
(through :meth:`~pipelines.extract.recipe.Recipe.from_lineage`), and the
weights file's SHA-256 must match the lineage's, so a query is never embedded
in another space.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featurestore import Lineage
from featurestore.scan import hash_file
from pipelines.extract.engine import EngineSettings, FeatureEngine, run_engine
from pipelines.extract.loader import ImageTask
from pipelines.extract.recipe import Recipe


def engine_settings_for(lineage: Lineage, *, weights_path: str | None = None,
                        batch_size: int = 8, cache_dir=None) -> EngineSettings:
    """Engine settings that reproduce ``lineage``'s raw-view features.

    ``weights_path`` is needed when the table was computed from a weights file
    (``file:<name>``); for ``imagenet`` Keras' cache is used unless it is given.
    A file whose SHA-256 differs from the lineage's is refused. The runtime is
    the lineage's where it runs here (see ``Recipe.from_lineage``); ``cache_dir``
    (``store.paths.openvino_cache``) keeps its converted model across runs.
    """
    recipe = Recipe.from_lineage(lineage).with_weights_file(weights_path)
    return recipe.engine_settings(batch_size, cache_dir=cache_dir)


@dataclass
class FeatureBatch:
    """Raw-view features of one engine batch, in the order of its files that decoded."""

    X: np.ndarray
    """``(n_ok, n_features)`` float32."""
    image_ids: list[str]
    paths: list[str]
    errors: list[tuple[str, str, str]]
    """``(path, image_id, reason)`` of files that failed since the previous batch."""


def iter_feature_batches(files: Iterable[tuple[str | Path, str]], lineage: Lineage,
                         settings: EngineSettings, *, workers: int = 1,
                         on_ready: Callable[[], None] | None = None,
                         engine: FeatureEngine | None = None) -> Iterator[FeatureBatch]:
    """Features of ``(path, image_id)`` pairs, one :class:`FeatureBatch` per engine batch.

    ``image_id`` is the SHA-256 of the file (``hash_file``); a file whose bytes
    no longer hash to it when decoded is reported in ``errors``, never featurized.
    ``settings`` come from :func:`engine_settings_for` (so the weights were
    checked before this is called); ``workers > 1`` runs pinned worker
    processes (see :func:`pipelines.engine.run_engine`). ``engine``, an in-process
    :class:`FeatureEngine` built from ``settings``, is reused instead (a server keeps
    one per recipe so the backbone is built once).
    """
    # The engine checks that the bytes it decodes still hash to image_id, so a file
    # rewritten since it was hashed fails alone instead of scoring under the old id.
    tasks = (ImageTask(image_id=image_id, path=str(path), file=str(path), label="", split="",
                       aug_ids=(0,), hashed_at="it was hashed",
                       rehash_hint="rerun to use its new bytes")
             for path, image_id in files)
    results = engine.run(tasks) if engine is not None else \
        run_engine(settings, tasks, workers=workers, on_ready=on_ready)
    for result in results:
        if result.rows:
            X = result.features[lineage.pool]
        else:
            X = np.empty((0, 0), np.float32)
        yield FeatureBatch(X, [row.image_id for row in result.rows],
                           [row.path for row in result.rows], list(result.errors))


def featurize_files(paths: Sequence[str | Path], lineage: Lineage, *,
                    weights_path: str | None = None, cache_dir=None
                    ) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """Raw-view features of image files under ``lineage``'s recipe.

    Returns ``(X, image_ids, errors)``: ``X`` is ``(n_ok, n_features)`` float32
    in the order of the files that decoded, ``image_ids`` their SHA-256 ids,
    and ``errors`` the ``(path, reason)`` of files that failed.
    """
    settings = engine_settings_for(lineage, weights_path=weights_path, cache_dir=cache_dir)
    files = [(p, hash_file(p)) for p in paths]
    features, ids, errors = [], [], []
    for batch in iter_feature_batches(files, lineage, settings):
        if batch.image_ids:
            features.append(batch.X)
            ids += batch.image_ids
        errors += [(path, reason) for path, _, reason in batch.errors]
    width = features[0].shape[1] if features else 0
    X = np.concatenate(features) if features else np.empty((0, width), np.float32)
    return X, ids, errors
