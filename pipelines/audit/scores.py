"""Out-of-sample probabilities of fitted heads, combined into one ensemble for the audit.

Training images are scored by ``oof.parquet`` (out-of-fold: each image was
predicted by a model that never saw it); held-out images by ``heldout.parquet``
(the refitted head, which never saw them either). Both files have columns
``image_id``, ``label`` and ``proba_<label>`` per class; ``oof.parquet`` also
``fold``, the fold that scored the row. A table with augmented views also has
``oof-views.parquet``: the same folds' probabilities of each train image's
views (the fold that scored an image scored its views, and trained on none of
them); the audit averages each image's probabilities over its raw row and
views (test-time augmentation that the store already paid for), when asked.

Out-of-fold probabilities are recalibrated per head before they are combined
(:func:`classifiers.calibration.calibrate_out_of_fold`, cross-fitted on the
same folds), so an over-confident head does not outvote the others. The
members (heads, and the audit's neighbour vote) are then weighted by greedy
ensemble selection on their log-loss against the given labels
(:func:`classifiers.heads.ensemble.greedy_selection`), so a weak member adds
what it knows without diluting a strong one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from featurestore import FeatureStoreError, Store
from pipelines.heads.models import (HELDOUT_FILE, OOF_FILE, OOF_VIEWS_FILE, PROBA_PREFIX,
                                    list_models, model_dir, prediction_file)


#: How the audit weights its members: ``greedy`` (Caruana selection on log-loss) or ``equal``.
WEIGHTINGS = ("greedy", "equal")


@dataclass
class Scores:
    """The ensemble's view of the audited images, ``n_rows`` of them."""

    image_id: np.ndarray
    """(n_rows,) image ids, sorted."""
    labels: np.ndarray
    """(n_rows,) int index of each given label into ``classes``."""
    members: list[np.ndarray]
    """(n_rows, n_classes) recalibrated probabilities of each member, in ``heads`` order."""
    classes: list[str]
    heads: list[str]
    """Members (``<head>[@<view>]``, ``neighbours``)."""
    fold: np.ndarray | None = None
    """(n_rows,) fold that scored each row (out-of-fold scores only)."""
    weights: np.ndarray | None = None
    """(n_members,) weights of ``proba``, summing to 1 (set by :meth:`combine`)."""
    proba: np.ndarray | None = None
    """(n_rows, n_classes) weighted mean of the members (set by :meth:`combine`)."""

    def add_member(self, name: str, proba: np.ndarray) -> None:
        self.members.append(proba)
        self.heads.append(name)

    def combine(self, weighting: str = "greedy") -> np.ndarray:
        """Weight the members into ``proba`` (``weighting``: one of ``WEIGHTINGS``); returns it."""
        if weighting == "greedy" and len(self.members) > 1:
            from classifiers.heads.ensemble import greedy_selection

            self.weights = greedy_selection(self.members, self.labels)
        else:
            self.weights = np.full(len(self.members), 1 / len(self.members))
        self.proba = np.tensordot(self.weights, np.stack(self.members), axes=1)
        return self.proba


def load_scores(store: Store, table_key: str, heads: Sequence[str] | None,
                split: str = "train", calibration: str = "temperature",
                tta: bool = False) -> Scores:
    """The heads' probabilities of ``split`` images as members, aligned by image id.

    ``calibration`` (``temperature``, ``isotonic``, ``none``) applies to
    out-of-fold scores only: held-out scores have no folds to cross-fit on.
    ``tta`` averages each train image over its views where the head scored them.
    """
    file = OOF_FILE if split == "train" else HELDOUT_FILE
    available = [r for r in list_models(store)
                 if r.table_key == table_key and (r.path / file).exists()]
    names = [r.head + (f"@{r.view}" if r.view else "") for r in available]
    if heads is None:
        heads = _default_heads(available)
    if not heads:
        raise FeatureStoreError(f"No fitted heads with {file} on table {table_key}; run "
                                f"`featurestore fit-heads --table {table_key}` first. Heads "
                                f"available: {', '.join(names) or 'none'}.")
    frames = []
    for name in heads:
        head, _, view = name.partition("@")
        path = model_dir(store, table_key, head, view or None) / file
        if name not in names or not path.exists():
            raise FeatureStoreError(f"No {file} for head {name!r} on table {table_key}. "
                                    f"Heads available: {', '.join(names) or 'none'}.")
        frame = pd.read_parquet(prediction_file(path.parent, file))  # saved with this model?
        views = prediction_file(path.parent, OOF_VIEWS_FILE) if tta and split == "train" else None
        if views is not None:
            frame = _average_views(frame, pd.read_parquet(views))
        frames.append((name, frame.sort_values("image_id", ignore_index=True)))
    return _ensemble(frames, split, calibration)


def _default_heads(available) -> list[str]:
    """The feature heads fitted on the whole table: what a user means by "the table's heads".

    The ensemble's scores are its members' weighted mean: it would count them
    twice. A fine-tuned model (``<head>+ft``) is ranked under the table's key
    and has a ``heldout.parquet``, but it reads pixels with a retrained
    backbone, not the audited features: it joins an audit only when named.
    """
    from pipelines.cnn.predict import is_end_to_end

    heads = [r for r in available if r.view is None and not is_end_to_end(r)]
    return [r.head for r in heads if r.head != "ensemble"] or [r.head for r in heads]


def _average_views(frame: pd.DataFrame, views: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with each image's probabilities averaged over its row and its views' rows."""
    columns = [c for c in frame if c.startswith(PROBA_PREFIX)]
    views = views[views["image_id"].isin(frame["image_id"])]
    rows = pd.concat([frame[["image_id", *columns]], views[["image_id", *columns]]])
    mean = rows.groupby("image_id", sort=False)[columns].mean()
    out = frame.copy()
    out[columns] = mean.loc[frame["image_id"]].to_numpy()
    return out


def _ensemble(frames: list[tuple[str, pd.DataFrame]], split: str, calibration: str) -> Scores:
    first_name, first = frames[0]
    columns = sorted(c for c in first if c.startswith(PROBA_PREFIX))
    for name, frame in frames[1:]:
        same_rows = frame["image_id"].equals(first["image_id"])
        if not same_rows or not frame["label"].astype(str).equals(first["label"].astype(str)):
            raise FeatureStoreError(
                f"Heads {first_name!r} and {name!r} scored different {split} images or "
                f"labels (fitted at different times or on different views); refit them "
                f"together, or audit with one of them (--heads).")
        if sorted(c for c in frame if c.startswith(PROBA_PREFIX)) != columns:
            raise FeatureStoreError(f"Heads {first_name!r} and {name!r} have different classes.")
    classes = [c[len(PROBA_PREFIX):] for c in columns]
    labels = first["label"].astype(str).to_numpy()
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise FeatureStoreError(f"Labels {unknown} have no probability column in the heads' "
                                f"{split} predictions.")
    from classifiers.calibration import calibrate_out_of_fold  # scikit-learn's calibration

    index = np.searchsorted(classes, labels)
    # Each head is calibrated on its own folds (heads may be fitted with other --cv/--seed).
    members = [calibrate_out_of_fold(
        index, f[columns].to_numpy(dtype=np.float64), f["fold"].to_numpy(),
        method=calibration) if "fold" in f else f[columns].to_numpy(dtype=np.float64)
        for _, f in frames]
    fold = first["fold"].to_numpy() if "fold" in first else None
    return Scores(first["image_id"].astype(str).to_numpy(), index, members, classes,
                  [n for n, _ in frames], fold)
