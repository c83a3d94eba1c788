"""Review decisions for ``audit-labels``: read, check and store them as a named view.

A reviewer edits the audit's ``suspects.csv`` (or ``.parquet``), filling
``decision`` with ``keep``, ``relabel`` or ``drop`` (``new_label`` for a
relabel, ``reason`` optional); rows left blank are unreviewed and ignored.
``--accept-top K`` is the fast path: the top K suspects are dropped (default)
or relabelled to their suggested label.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from featurestore import FeatureStoreError
from featurestore._io import restore_formula
from featurestore.views import ACTIONS

ACCEPT_AS = ("drop", "relabel")


def read_decisions(path: str | Path) -> pd.DataFrame:
    """The edited decisions file (CSV or Parquet) as strings; blanks are ``""``.

    A CSV's cells lose the ``'`` that :func:`featurestore._io.write_csv` put before
    formula-like text, so a relabel to a class named ``=x`` means ``=x``.
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".parquet":
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
            frame = frame.rename(columns=restore_formula).map(restore_formula)
    except (OSError, ValueError) as err:
        raise FeatureStoreError(f"Cannot read decisions file {path}: {err}") from err
    if "decision" not in frame and "action" in frame:
        frame = frame.rename(columns={"action": "decision"})
    missing = [c for c in ("image_id", "decision") if c not in frame]
    if missing:
        raise FeatureStoreError(f"Decisions file {path} lacks column(s) {missing}; it needs "
                                f"image_id, decision (keep/relabel/drop), and new_label for "
                                f"relabels (the audit's suspects.csv has them all).")
    for column in ("new_label", "reason", "who"):
        if column not in frame:
            frame[column] = ""
    return frame.fillna("").astype(str)


def check_decisions(frame: pd.DataFrame, images: pd.DataFrame, classes, *,
                    include_heldout: bool, author: str, reason: str | None) -> pd.DataFrame:
    """View decisions (``featurestore.views.DECISION_COLUMNS``) from a reviewed file.

    ``images`` has one row per image of the table (columns image_id, split);
    ``classes`` are the labels a relabel may use. Every problem names its row
    (1-based, as a spreadsheet shows it after the header).
    """
    split_of = dict(zip(images["image_id"], images["split"]))
    known_classes = {str(c) for c in classes}
    out, seen = [], {}
    for number, row in enumerate(frame.itertuples(index=False), start=1):
        decision = row.decision.strip().lower()
        if not decision:
            continue  # not reviewed
        where = f"Row {number} (image {row.image_id[:16]})"
        if decision not in ACTIONS:
            raise FeatureStoreError(f"{where}: unknown decision {row.decision!r}; allowed: "
                                    f"{', '.join(ACTIONS)} (or blank for unreviewed).")
        if row.image_id not in split_of:
            raise FeatureStoreError(f"{where}: no image with this id in the table.")
        if split_of[row.image_id] != "train" and not include_heldout:
            raise FeatureStoreError(
                f"{where}: the image is in the held-out split {split_of[row.image_id]!r}; "
                f"held-out images change only in a view that says so (--include-heldout).")
        new_label = row.new_label.strip()
        if decision == "relabel" and new_label not in known_classes:
            wanted = f"unknown class {new_label!r}" if new_label else "no new_label"
            raise FeatureStoreError(f"{where}: relabel with {wanted}; classes: "
                                    f"{', '.join(sorted(known_classes))}.")
        if row.image_id in seen:
            raise FeatureStoreError(f"{where}: the image already has a decision in row "
                                    f"{seen[row.image_id]}.")
        seen[row.image_id] = number
        out.append({"image_id": row.image_id, "action": decision,
                    "new_label": new_label if decision == "relabel" else None,
                    "who": row.who.strip() or author,
                    "why": row.reason.strip() or reason or ""})
    if not out:
        raise FeatureStoreError("The decisions file has no reviewed row: fill the decision "
                                "column with keep, relabel or drop.")
    return pd.DataFrame(out)


def accept_top(suspects: pd.DataFrame, k: int, *, accept_as: str, author: str,
               why: str) -> pd.DataFrame:
    """Decisions for the ``k`` worst suspects: ``drop`` them or ``relabel`` to the suggestion."""
    if accept_as not in ACCEPT_AS:
        raise FeatureStoreError(f"accept_as must be one of {', '.join(ACCEPT_AS)}; "
                                f"got {accept_as!r}.")
    if k < 1:
        raise FeatureStoreError(f"accept_top must be >= 1; got {k}.")
    top = suspects.sort_values("rank").head(k)
    if top.empty:
        raise FeatureStoreError("The audit flagged no image: nothing to accept, no view stored.")
    return pd.DataFrame({
        "image_id": top["image_id"], "action": accept_as,
        "new_label": top["suggested_label"] if accept_as == "relabel" else None,
        "who": author,
        "why": [f"{why}: rank {r}, score {s:.4f}, suggested {g}"
                for r, s, g in zip(top["rank"], top["score"], top["suggested_label"])]})
