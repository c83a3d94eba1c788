"""Exact nearest-neighbour search over feature matrices, chunked so memory stays bounded.

Scores come from BLAS matrix products (``queries @ block.T``) over row blocks
of the base matrix; each block's top-k is merged into a running top-k, so the
largest temporary is ``n_queries x block_rows`` floats, never the full
distance matrix.

Metrics: ``cosine`` (distance ``1 - cos``) and ``l2`` (Euclidean distance).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from featurestore.errors import FeatureStoreError

METRICS = ("cosine", "l2")

#: Bytes of the largest score block held at once (n_queries x block_rows float32).
DEFAULT_BLOCK_BYTES = 16 << 20  # measured: larger blocks only add argpartition temporaries


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise FeatureStoreError(f"Unknown metric {metric!r}. Available: {', '.join(METRICS)}.")
    return metric


def normalize_rows(X: np.ndarray, *, copy: bool = True) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero); float32 ``(n, d)``."""
    X = np.array(X, dtype=np.float32, copy=copy)
    norms = np.sqrt(np.einsum("ij,ij->i", X, X))[:, None]  # no (n, d) temporary
    np.divide(X, norms, out=X, where=norms > 0)
    return X


def prepare_base(X: np.ndarray, metric: str, *, copy: bool = True) -> np.ndarray:
    """The base matrix as searched: unit rows for cosine, as is for l2."""
    check_metric(metric)
    return normalize_rows(X, copy=copy) if metric == "cosine" else \
        np.array(X, dtype=np.float32, copy=copy)


@dataclass
class Neighbours:
    """Result of a k-NN search: ``(n_queries, k)`` arrays, nearest first.

    ``index`` holds base row positions (-1 where fewer than k rows qualified)
    and ``distance`` the matching distances (``inf`` for -1).
    """

    distance: np.ndarray
    index: np.ndarray


def exact_search(queries: np.ndarray, base: np.ndarray, k: int, *, metric: str = "cosine",
                 base_prepared: bool = False, query_groups: np.ndarray | None = None,
                 base_groups: np.ndarray | None = None,
                 block_bytes: int = DEFAULT_BLOCK_BYTES) -> Neighbours:
    """The ``k`` nearest base rows of every query, exactly.

    Parameters
    ----------
    queries : (n_queries, d) array
    base : (n_base, d) array; already passed through :func:`prepare_base` when
        ``base_prepared`` (an index keeps it that way).
    k : int
    metric : ``"cosine"`` or ``"l2"``.
    query_groups, base_groups : (n_queries,), (n_base,) integer arrays, optional
        A base row whose group equals its query's group is never returned; this
        keeps an image and its own augmented views out of its neighbours.
    block_bytes : int
        Bound on the score block held at once.
    """
    check_metric(metric)
    if k < 1:
        raise FeatureStoreError(f"k must be >= 1; got {k}.")
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    if queries.shape[1] != base.shape[1]:
        raise FeatureStoreError(
            f"Queries have {queries.shape[1]} features but the base has {base.shape[1]}.")
    if (query_groups is None) != (base_groups is None):
        raise FeatureStoreError("Give both query_groups and base_groups, or neither.")
    if not base_prepared:
        base = prepare_base(base, metric)
    if metric == "cosine":
        queries = normalize_rows(queries)
    n_q, n_b = len(queries), len(base)
    block_rows = max(1, int(block_bytes // (4 * max(n_q, 1))))
    best_s = np.full((n_q, k), -np.inf, dtype=np.float32)
    best_i = np.full((n_q, k), -1, dtype=np.int64)
    for b0 in range(0, n_b, block_rows):
        block = base[b0: b0 + block_rows]
        scores = queries @ block.T  # the BLAS product that dominates the cost
        if metric == "l2":  # maximise 2 q.x - |x|^2  <=>  minimise |q - x|^2
            scores *= 2
            scores -= np.einsum("ij,ij->i", block, block)[None, :]
        if query_groups is not None:
            scores[query_groups[:, None] == base_groups[None, b0: b0 + len(block)]] = -np.inf
        best_s, best_i = _merge_topk(best_s, best_i, scores, b0, k)
    order = np.argsort(-best_s, axis=1, kind="stable")
    best_s = np.take_along_axis(best_s, order, axis=1)
    best_i = np.take_along_axis(best_i, order, axis=1)
    best_i[~np.isfinite(best_s)] = -1
    return Neighbours(_to_distance(best_s, queries, metric), best_i)


def _merge_topk(best_s, best_i, scores, offset, k):
    kk = min(k, scores.shape[1])
    top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
    cand_s = np.concatenate([best_s, np.take_along_axis(scores, top, axis=1)], axis=1)
    cand_i = np.concatenate([best_i, top + offset], axis=1)
    keep = np.argpartition(-cand_s, k - 1, axis=1)[:, :k]
    return np.take_along_axis(cand_s, keep, axis=1), np.take_along_axis(cand_i, keep, axis=1)


def _to_distance(scores: np.ndarray, queries: np.ndarray, metric: str) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        if metric == "cosine":
            dist = 1.0 - scores
        else:
            q2 = np.einsum("ij,ij->i", queries, queries)[:, None]
            dist = np.sqrt(np.maximum(q2 - scores, 0.0))
    dist[~np.isfinite(scores)] = np.inf
    return dist.astype(np.float32)


def pairs_within(X: np.ndarray, threshold: float, *, metric: str = "cosine",
                 block_bytes: int = DEFAULT_BLOCK_BYTES) -> pd.DataFrame:
    """Every pair ``i < j`` of rows closer than ``threshold``: columns i, j, distance.

    Exact, in ``n x block`` score blocks; cost grows with ``n^2 d``.
    """
    base = prepare_base(X, metric)
    sq = np.einsum("ij,ij->i", base, base)
    found = []
    step = max(1, int(np.sqrt(block_bytes / 4)))
    for a0 in range(0, len(base), step):
        A = base[a0: a0 + step]
        for b0 in range(a0, len(base), step):
            B = base[b0: b0 + step]
            dots = A @ B.T
            if metric == "cosine":
                dist = 1.0 - dots
            else:
                dist = np.sqrt(np.maximum(sq[a0: a0 + len(A), None] + sq[None, b0: b0 + len(B)]
                                          - 2 * dots, 0.0))
            ii, jj = np.nonzero(dist < threshold)
            ii, jj = ii + a0, jj + b0
            keep = ii < jj
            found.append(pd.DataFrame({"i": ii[keep], "j": jj[keep],
                                       "distance": dist[ii[keep] - a0, jj[keep] - b0]}))
    if not found:
        return pd.DataFrame({"i": [], "j": [], "distance": []})
    return pd.concat(found, ignore_index=True).sort_values("distance", ignore_index=True)


def precision_at_k(neighbour_labels: np.ndarray, query_labels: np.ndarray) -> np.ndarray:
    """Fraction of each query's neighbours sharing its label, ``(n_queries,)``.

    ``neighbour_labels`` is ``(n_queries, k)``; missing neighbours (``None``)
    count as misses.
    """
    return (neighbour_labels == np.asarray(query_labels)[:, None]).mean(axis=1)
