"""Is this pair of the same class? A probability from an embedding distance.

Fitted on validation pairs (never the rows the projection learned from):
logistic regression of "same class" on the distance (Platt scaling), so the
threshold where the probability crosses 0.5 is calibrated, not guessed. Pairs
are drawn balanced (as many same-class as different-class pairs), so the
probability is the one of a pair with even prior odds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from classifiers.errors import ClassifierError

MAX_ROWS = 3000


def sample_pairs(labels, groups, *, n_pairs: int = 20000, seed: int = 0):
    """``(i, j, same)``: up to ``n_pairs`` row pairs of different source images, half of
    them same-class (as many as exist), the rest different-class."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    rng = np.random.default_rng(seed)
    # All pairs of at most MAX_ROWS rows (4.5 million), so memory stays bounded.
    rows = np.sort(rng.permutation(len(labels))[:MAX_ROWS])
    i, j = (rows[t] for t in np.triu_indices(len(rows), k=1))
    keep = groups[i] != groups[j]
    i, j = i[keep], j[keep]
    same = labels[i] == labels[j]
    if not same.any() or same.all():
        raise ClassifierError(
            f"cannot calibrate a verifier: its {len(labels)} rows give {int(same.sum())} "
            f"same-class and {int((~same).sum())} different-class pairs; both are needed "
            f"(at least 2 images of one class, and 2 classes)")
    half = n_pairs // 2
    pos = rng.permutation(np.flatnonzero(same))[:half]
    neg = rng.permutation(np.flatnonzero(~same))[:max(half, n_pairs - len(pos))]
    chosen = np.sort(np.concatenate([pos, neg]))
    return i[chosen], j[chosen], same[chosen]


def pair_distances(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Row-wise Euclidean distance of ``(n, d)`` arrays."""
    return np.linalg.norm(np.asarray(A, np.float64) - np.asarray(B, np.float64), axis=1)


@dataclass(frozen=True)
class PairVerifier:
    """``P(same class | distance) = 1 / (1 + exp(-(coef * distance + intercept)))``."""

    coef: float
    intercept: float
    threshold: float
    """Distance at which the probability is 0.5: below it, "same class"."""
    roc_auc: float
    """ROC AUC of the distance on the pairs it was fitted on."""
    n_pairs: int

    @classmethod
    def fit(cls, distances, same) -> PairVerifier:
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import roc_auc_score

        d = np.asarray(distances, np.float64).reshape(-1, 1)
        same = np.asarray(same, bool)
        model = LogisticRegression(C=1e4).fit(d, same)
        coef, intercept = float(model.coef_[0, 0]), float(model.intercept_[0])
        if coef >= 0:
            raise ClassifierError("Same-class pairs are not nearer than other pairs on the "
                                  "validation rows; this embedding cannot verify pairs.")
        return cls(coef, intercept, -intercept / coef, float(roc_auc_score(same, -d[:, 0])),
                   int(len(same)))

    def predict_proba(self, distances) -> np.ndarray:
        """``(n,)`` probabilities that each pair is of one class."""
        z = self.coef * np.asarray(distances, np.float64) + self.intercept
        return 1.0 / (1.0 + np.exp(-z))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PairVerifier:
        return cls(**{k: data[k] for k in ("coef", "intercept", "threshold", "roc_auc",
                                           "n_pairs")})
