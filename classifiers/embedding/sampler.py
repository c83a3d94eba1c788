"""Batches of P classes x K rows, built per class and spread over source images.

Triplet and contrastive losses learn only from the positives and negatives
inside a batch; a random batch of a many-class table holds almost no pair of
one class. So every batch takes ``p`` classes and ``k`` rows of each. The
``k`` rows of a class come from ``k`` different source images where the class
has that many (an augmented view stands in for its image, so views are extra
positives of their source, never the only positives of a class that has more
images).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from classifiers.errors import ClassifierError


def check_classes(labels: np.ndarray, groups: np.ndarray, *, minimum: int = 2) -> None:
    """Refuse classes with fewer than ``minimum`` source images (no positive pair to learn)."""
    pairs = np.unique(np.stack([np.asarray(labels, str), np.asarray(groups, str)]), axis=1)
    names, counts = np.unique(pairs[0], return_counts=True)
    few = {str(n): int(c) for n, c in zip(names, counts) if c < minimum}
    if few:
        shown = ", ".join(f"{n!r} ({c})" for n, c in sorted(few.items())[:10])
        raise ClassifierError(
            f"{len(few)} class(es) have fewer than {minimum} images (augmented views of one "
            f"image do not count): {shown}; an embedding needs {minimum} per class.")


class PKSampler:
    """Row indices of batches of ``p`` classes x ``k`` rows; ``len(batch) == p * k``.

    ``labels`` and ``groups`` (the source image of each row) are ``(n_rows,)``.
    Every class is drawn about equally often; with fewer than ``p`` classes, each
    batch takes them all. ``batches()`` yields one epoch: about ``n_rows / (p * k)``
    batches.
    """

    def __init__(self, labels, groups, *, p: int = 16, k: int = 4, seed: int = 0):
        if p < 2 or k < 2:
            raise ClassifierError(f"p and k must be >= 2 (classes and rows per batch); "
                                  f"got p={p}, k={k}.")
        labels, groups = np.asarray(labels), np.asarray(groups)
        check_classes(labels, groups)
        self.classes_, label_codes = np.unique(labels, return_inverse=True)
        self.p, self.k = min(p, len(self.classes_)), k
        self.n_rows = len(labels)
        self._rng = np.random.default_rng(seed)
        # class -> list of (rows of one source image)
        self._images = []
        for c in range(len(self.classes_)):
            rows = np.flatnonzero(label_codes == c)
            _, image = np.unique(groups[rows], return_inverse=True)
            self._images.append([rows[image == i] for i in range(image.max() + 1)])

    @property
    def batch_size(self) -> int:
        return self.p * self.k

    def __len__(self) -> int:
        return max(1, self.n_rows // self.batch_size)

    def batches(self) -> Iterator[np.ndarray]:
        order = np.empty(0, int)
        for _ in range(len(self)):
            if order.size < self.p:  # classes in turn, reshuffled; never twice in a batch
                fresh = self._rng.permutation(len(self.classes_))
                order = np.concatenate([order, fresh[~np.isin(fresh, order)]])
            chosen, order = order[:self.p], order[self.p:]
            yield np.concatenate([self._rows_of(c) for c in chosen])

    def _rows_of(self, c: int) -> np.ndarray:
        images = self._images[c]
        many = len(images) >= self.k
        picked = self._rng.choice(len(images), self.k, replace=not many)
        if not many:  # every image once before any repeats
            picked[:len(images)] = self._rng.permutation(len(images))
        return np.array([self._rng.choice(images[i]) for i in picked])
