"""2-D maps of a feature table: PCA of the raw rows, and t-SNE or UMAP of a sample.

Features are standardised and reduced to at most 50 principal components
first; PCA's first two components are drawn as they are, and t-SNE/UMAP run
on the 50 components of a capped random sample (t-SNE costs grow faster than
linearly with rows, so the report says it shows a sample).
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass, field

import numpy as np
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from featurestore import FeatureStoreError, TableReader

#: Second embedding beside PCA: ``pca`` draws PCA only.
MAP_METHODS = ("pca", "tsne", "umap")
_COMPONENTS = 50


def check_map_method(method: str) -> None:
    """Fail early, naming the choices, for an unknown method or a missing umap-learn."""
    if method not in MAP_METHODS:
        raise FeatureStoreError(
            f"map must be one of {', '.join(MAP_METHODS)}; got {method!r}.")
    if method == "umap" and importlib.util.find_spec("umap") is None:
        raise FeatureStoreError(
            "map 'umap' needs the umap-learn package: pip install -e \".[umap]\" "
            "(or choose map tsne or pca).")


@dataclass
class TableMap:
    """The panels of one table's map and what colours them."""

    panels: list[tuple[str, np.ndarray, np.ndarray]] = field(default_factory=list)
    """``(subtitle, points (m, 2), rows (m,) into labels/errors)`` per embedding."""
    labels: np.ndarray | None = None
    """``(n,)`` label of each mapped row."""
    errors: np.ndarray | None = None
    """``(n,)`` True where the best head misclassifies the row."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Time per embedding (``pca``, ``tsne``, ``umap``)."""


def table_map(reader: TableReader, wrong_ids: set[str], *, method: str, max_points: int,
              sample: int, seed: int) -> TableMap:
    """Embed up to ``max_points`` raw rows of ``reader``; ``sample`` of them for t-SNE/UMAP."""
    rng = np.random.default_rng(seed)
    rows = np.flatnonzero(reader.column("aug_id") == 0)
    if rows.size > max_points:
        rows = np.sort(rng.choice(rows, max_points, replace=False))
    result = TableMap(labels=reader.column("label")[rows],
                      errors=np.isin(reader.column("image_id")[rows], list(wrong_ids)))
    if rows.size < 3:
        return result
    started = time.perf_counter()
    X = StandardScaler().fit_transform(reader.read_features(rows))
    n_components = min(_COMPONENTS, X.shape[0] - 1, X.shape[1])
    pca = PCA(n_components=n_components, svd_solver="randomized", random_state=seed)
    reduced = pca.fit_transform(X)
    if reduced.shape[1] < 2:
        reduced = np.column_stack([reduced, np.zeros(len(reduced))])
    ratio = np.append(pca.explained_variance_ratio_, 0.0)
    result.panels.append((f"PCA of {rows.size:,} raw rows (PC1 {ratio[0]:.0%}, "
                          f"PC2 {ratio[1]:.0%} of variance)", reduced[:, :2],
                          np.arange(rows.size)))
    result.seconds["pca"] = time.perf_counter() - started
    if method != "pca" and rows.size >= 5:
        started = time.perf_counter()
        picked = np.sort(rng.choice(rows.size, min(sample, rows.size), replace=False))
        points, how = _embed(method, reduced[picked], seed)
        shown = "all" if picked.size == rows.size else "a random sample of"
        result.panels.append((f"{how} of {shown} {picked.size:,} of the {rows.size:,} rows",
                              points, picked))
        result.seconds[method] = time.perf_counter() - started
    return result


def _embed(method: str, X: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    """``(points (n, 2), description)`` of ``X (n, k)`` by t-SNE or UMAP."""
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, (len(X) - 1) / 3.0))
        # 500 iterations (250 exaggerated + 250 free) halve sklearn's default 1,000 and
        # already settle the clusters a visual check needs; t-SNE dominates the build.
        points = TSNE(n_components=2, perplexity=perplexity, init="pca", max_iter=500,
                      random_state=seed).fit_transform(X)
        return points, f"t-SNE (perplexity {perplexity:.0f}, 500 iterations)"
    import umap  # checked by check_map_method

    neighbours = min(15, len(X) - 1)
    points = umap.UMAP(n_neighbors=neighbours, random_state=seed).fit_transform(X)
    return points, f"UMAP ({neighbours} neighbours)"
