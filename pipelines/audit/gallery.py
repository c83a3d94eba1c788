"""The label-audit gallery: each suspect beside its nearest images of both labels.

A reviewer decides faster when the suspect stands next to the images that the
features find most alike: if it sits among the suggested class and far from
its own, the label is likely wrong; if it is unlike everything, the scan may
be blurred, dirty or empty.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from featurestore import FeatureStoreError, Store
from featurestore.similarity import exact_search
from pipelines.html import render_page, thumbnail


def class_neighbours(X: np.ndarray, labels: np.ndarray, queries: np.ndarray,
                     wanted: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest rows of class ``wanted[i]`` for each query row ``queries[i]``.

    ``X`` is ``(n_rows, n_features)``, ``labels`` ``(n_rows,)``; ``queries`` are
    row positions and never their own neighbours. Returns ``(index, similarity)``,
    both ``(n_queries, k)``, nearest first; index -1 where a class has fewer rows.
    """
    index = np.full((len(queries), k), -1, dtype=np.int64)
    similarity = np.full((len(queries), k), np.nan, dtype=np.float32)
    for label in np.unique(wanted):
        asking = np.flatnonzero(wanted == label)
        base = np.flatnonzero(labels == label)
        if not len(base):
            continue
        found = exact_search(X[queries[asking]], X[base], k, metric="cosine",
                             query_groups=queries[asking], base_groups=base)
        hit = found.index >= 0
        index[asking] = np.where(hit, base[np.maximum(found.index, 0)], -1)
        similarity[asking] = np.where(hit, 1.0 - found.distance, np.nan)
    return index, similarity


def image_paths(store: Store, paths: pd.Series) -> list[Path | None]:
    """Files of the table's ``path`` column: through the manifest when the store has one."""
    manifest = None
    if store.manifest_path.exists():
        manifest = store.manifest()
    out = []
    try:
        for path in paths:
            if not path:
                out.append(None)
            elif Path(path).is_absolute() or manifest is None:
                out.append(Path(path))
            else:
                try:
                    out.append(manifest.absolute_path(path))
                except FeatureStoreError:
                    out.append(None)  # the page says "no image" rather than failing
    finally:
        if manifest is not None:
            manifest.close()
    return out


def write_gallery(out_dir: Path, store: Store, suspects: pd.DataFrame, rows: pd.DataFrame,
                  X: np.ndarray, *, k: int, context: dict, heatmaps=None) -> Path:
    """Render ``out_dir/index.html`` with thumbnails under ``out_dir/thumbs``.

    ``rows`` are the audited images in the order of ``X`` (columns image_id,
    given_label, path); ``suspects`` (image_id, given_label, suggested_label,
    score, rank, path) are shown worst first. ``heatmaps``, a callable
    ``[(image_id, path), ...] -> ({image_id: relative png}, note)`` (the
    report's :class:`pipelines.explain.gallery.GalleryHeatmaps` bound to the
    audited heads), puts a heatmap beside each suspect's thumbnail.
    """
    suspects = suspects.sort_values("rank")
    position = pd.Series(np.arange(len(rows)), index=rows["image_id"].to_numpy())
    queries = position.loc[suspects["image_id"]].to_numpy()
    labels = rows["given_label"].to_numpy().astype(str)
    same = class_neighbours(X, labels, queries, labels[queries], k)
    other = class_neighbours(X, labels, queries,
                             suspects["suggested_label"].to_numpy().astype(str), k)
    files = dict(zip(rows["image_id"], image_paths(store, rows["path"])))

    def thumb(image_id):
        source = files.get(image_id)
        return None if source is None else thumbnail(source, out_dir, image_id[:32])

    def neighbours(index, similarity):
        return [{"image_id": rows["image_id"].iloc[i], "label": labels[i],
                 "thumb": thumb(rows["image_id"].iloc[i]), "similarity": float(s)}
                for i, s in zip(index, similarity) if i >= 0]

    items = []
    for j, suspect in enumerate(suspects.itertuples(index=False)):
        items.append({**suspect._asdict(), "thumb": thumb(suspect.image_id),
                      "same": neighbours(same[0][j], same[1][j]),
                      "other": neighbours(other[0][j], other[1][j])})
    found, note = {}, None
    if heatmaps is not None:
        found, note = heatmaps([(s["image_id"], files[s["image_id"]]) for s in items
                                if s["thumb"]])
    for s in items:
        s["heatmap"] = found.get(s["image_id"])
    return render_page(out_dir, "pipelines.audit", "audit.html", suspects=items,
                       heatmap_note=note, **context)
