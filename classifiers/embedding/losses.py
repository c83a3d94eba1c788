"""Triplet and contrastive losses over a batch, with online mining, in ``keras.ops``.

Written with ``keras.ops`` only, so they run on TensorFlow, JAX and PyTorch
alike (the maintained TensorFlow metric-learning packages do not support
Keras 3). Distances are Euclidean between L2-normalised embeddings, so they
lie in ``[0, 2]`` and one margin suits every table.

Mining follows FaceNet (Schroff et al., 2015) and Hermans et al. (2017):

* ``semi-hard``: for each anchor-positive pair, the nearest negative that is
  still farther than the positive; where there is none, the farthest negative
  that is nearer (the least hard of the hard ones);
* ``hard``: per anchor, its farthest positive against its nearest negative
  ("batch hard").
"""

from __future__ import annotations

import keras
from keras import ops

LOSSES = ("triplet", "contrastive")
MININGS = ("semi-hard", "hard")
#: Default margins for distances in [0, 2].
MARGINS = {"triplet": 0.2, "contrastive": 0.5}


def pairwise_distances(embeddings):
    """``(B, d)`` -> ``(B, B)`` Euclidean distances, with a finite gradient at 0."""
    sq = ops.sum(ops.square(embeddings), axis=1)
    d2 = ops.expand_dims(sq, 1) - 2.0 * ops.matmul(embeddings, ops.transpose(embeddings)) \
        + ops.expand_dims(sq, 0)
    d2 = ops.maximum(d2, 0.0)
    zero = ops.cast(ops.equal(d2, 0.0), d2.dtype)
    return ops.sqrt(d2 + zero * 1e-12) * (1.0 - zero)


def _masks(labels):
    """``(positive, negative)`` ``(B, B)`` masks; a row is not its own positive."""
    labels = ops.reshape(labels, (-1,))
    same = ops.equal(ops.expand_dims(labels, 1), ops.expand_dims(labels, 0))
    not_self = ops.logical_not(ops.eye(ops.shape(labels)[0], dtype="bool"))
    return ops.logical_and(same, not_self), ops.logical_not(same)


def semi_hard_negatives(distances, labels):
    """``(B, B)`` index of the negative mined for each (anchor, positive) pair.

    ``distances`` is ``(B, B)``, ``labels`` ``(B,)``. Entries of pairs that are not
    positives are meaningless (the loss masks them out).
    """
    _, negative = _masks(labels)
    d_ap = ops.expand_dims(distances, 2)                   # (a, p, 1)
    d_an = ops.expand_dims(distances, 1)                   # (a, 1, n)
    is_neg = ops.expand_dims(negative, 1)                  # (a, 1, n)
    outside = ops.logical_and(is_neg, ops.greater(d_an, d_ap))
    inside = ops.logical_and(is_neg, ops.logical_not(outside))
    big = ops.max(distances) + 1.0
    nearest_outside = ops.argmin(ops.where(outside, d_an, big), axis=2)
    farthest_inside = ops.argmax(ops.where(inside, d_an, -1.0), axis=2)
    return ops.where(ops.any(outside, axis=2), nearest_outside, farthest_inside)


def triplet_loss(labels, embeddings, *, margin: float = MARGINS["triplet"],
                 mining: str = "semi-hard"):
    """Mean hinge ``max(d(a, p) - d(a, n) + margin, 0)`` over the mined triplets."""
    dist = pairwise_distances(embeddings)
    positive, negative = _masks(labels)
    pos_f = ops.cast(positive, dist.dtype)
    if mining == "hard":
        hardest_pos = ops.max(dist * pos_f, axis=1)
        hardest_neg = ops.min(ops.where(negative, dist, ops.max(dist) + 1.0), axis=1)
        has_both = ops.cast(ops.logical_and(ops.any(positive, axis=1), ops.any(negative, axis=1)),
                            dist.dtype)
        hinge = ops.relu(hardest_pos - hardest_neg + margin) * has_both
        return ops.sum(hinge) / ops.maximum(ops.sum(has_both), 1.0)
    d_an = ops.take_along_axis(dist, semi_hard_negatives(dist, labels), axis=1)
    hinge = ops.relu(dist - d_an + margin) * pos_f
    return ops.sum(hinge) / ops.maximum(ops.sum(pos_f), 1.0)


def contrastive_loss(labels, embeddings, *, margin: float = MARGINS["contrastive"],
                     mining: str = "semi-hard"):
    """Positives pulled together (``d**2``), negatives pushed past ``margin``.

    ``semi-hard`` averages every positive pair and every negative inside the
    margin (those outside teach nothing), each set weighted equally; ``hard``
    keeps each anchor's farthest positive and nearest negative.
    """
    dist = pairwise_distances(embeddings)
    positive, negative = _masks(labels)
    pos_f, neg_f = ops.cast(positive, dist.dtype), ops.cast(negative, dist.dtype)
    if mining == "hard":
        hardest_pos = ops.max(dist * pos_f, axis=1)
        hardest_neg = ops.min(ops.where(negative, dist, ops.max(dist) + 1.0), axis=1)
        return ops.mean(ops.square(hardest_pos) + ops.square(ops.relu(margin - hardest_neg)))
    pull = ops.sum(ops.square(dist) * pos_f) / ops.maximum(ops.sum(pos_f), 1.0)
    push = ops.square(ops.relu(margin - dist)) * neg_f
    active = ops.cast(ops.greater(push, 0.0), dist.dtype)
    return pull + ops.sum(push) / ops.maximum(ops.sum(active), 1.0)


class MetricLoss(keras.losses.Loss):
    """A Keras loss over a whole P x K batch: ``y_true`` the labels, ``y_pred`` the embeddings."""

    def __init__(self, loss: str = "triplet", mining: str = "semi-hard",
                 margin: float | None = None, name: str = "metric_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.loss, self.mining = loss, mining
        self.margin = MARGINS[loss] if margin is None else margin
        self._fn = triplet_loss if loss == "triplet" else contrastive_loss

    def call(self, y_true, y_pred):
        return self._fn(y_true, y_pred, margin=self.margin, mining=self.mining)

    def get_config(self):
        return {**super().get_config(), "loss": self.loss, "mining": self.mining,
                "margin": self.margin}
