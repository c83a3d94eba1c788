"""The comparisons users ask for, built from the leaderboard and each table's lineage.

A comparison varies one thing and holds the rest fixed: max vs avg pooling
(same backbone, weights, input, augmentation, head, objective), raw vs
augmented training (same everything but the augmentation), head vs head (same
table and objective) and before vs after label cleaning (same table, head and
objective; view "" against a named view). Each row carries the held-out
metrics of the leaderboard and, where the model's ``oof.parquet`` is there,
each metric's mean and spread across the cross-validation folds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from featurestore import Lineage
from featurestore.lineage import NO_AUGMENTATION
from pipelines.report.data import FOLD_METRICS, ModelFacts

#: Values of a varied column shown first in their group: the "before" of a comparison.
BASELINES = ("", NO_AUGMENTATION)
#: Columns that describe the recipe of a row's table (from its lineage).
RECIPE = ("backbone", "weights", "input_size", "preprocessing")


@dataclass(frozen=True)
class Comparison:
    """Rows that differ only in ``vary``; ``fixed`` columns must be equal within a group."""

    name: str
    """HTML id and figure file stem."""
    title: str
    vary: str
    """Column whose values are compared side by side."""
    fixed: tuple[str, ...]
    """Columns held equal; they name each group."""


COMPARISONS = (
    Comparison("pooling", "Max vs avg pooling", "pool",
               RECIPE + ("augmentation", "head", "objective", "view")),
    Comparison("augmentation", "Raw vs augmented training", "augmentation",
               RECIPE + ("pool", "head", "objective", "view")),
    Comparison("heads", "Head vs head", "head", ("table", "objective", "view")),
    Comparison("views", "Before vs after label cleaning (whole table vs cleaned view)", "view",
               ("table", "head", "objective")),
)


def augmentation_name(lineage: Lineage | None) -> str:
    """:data:`~featurestore.lineage.NO_AUGMENTATION` or ``<preset> x<views>``."""
    if lineage is None or not lineage.augmentation:
        return NO_AUGMENTATION
    views = lineage.augmentation.get("views")
    return lineage.augmentation_preset + (f" x{views}" if views is not None else "")


def enrich_leaderboard(board: pd.DataFrame, lineages: dict[str, Lineage],
                       models: list[ModelFacts]) -> pd.DataFrame:
    """The leaderboard plus recipe columns and ``cv_<metric>`` = (mean, std, folds) or None.

    A model folder keeps only its latest fit, so fold spreads are attached to
    the row whose objective matches the model's ``model.json``.
    """
    if board.empty:
        return board
    spread = {(m.ref.table_key, m.ref.head, m.ref.view or "", m.meta.get("objective")):
              m.spread for m in models}
    rows = []
    for row in board.to_dict("records"):
        lineage = lineages.get(row["table_key"])
        recipe = {name: _recipe_value(lineage, name) for name in RECIPE + ("pool",)}
        key = (row["table_key"], row["head"], row.get("view", ""), row.get("objective"))
        found = spread.get(key, {})
        # The lineage's name, not the row's: leaderboards written before Lineage.name
        # spelled some tables otherwise (no size, no precision), or not at all (NaN).
        shown = row.get("table")
        table = lineage.name if lineage is not None else \
            shown if isinstance(shown, str) and shown else row["table_key"]
        rows.append({**row, **recipe, "augmentation": augmentation_name(lineage),
                     "table": table,
                     **{f"cv_{name}": found.get(name) for name in FOLD_METRICS}})
    return pd.DataFrame.from_records(rows)


def _recipe_value(lineage: Lineage | None, name: str) -> str:
    if lineage is None:
        return "?"
    if name == "weights":
        sha = lineage.weights_sha256
        return lineage.weights + (f" ({sha[:8]})" if sha else "")
    if name == "input_size":
        return "x".join(map(str, lineage.input_size))
    return str(getattr(lineage, name))


def comparison_groups(board: pd.DataFrame,
                      comparison: Comparison) -> list[tuple[str, pd.DataFrame]]:
    """``(group label, rows)`` for every group with two or more values of ``comparison.vary``.

    Rows within a group are sorted by the varied value, baselines first (view
    "" before a cleaned view, no augmentation before augmented).
    """
    if board.empty:
        return []
    groups = []
    for values, rows in board.groupby(list(comparison.fixed), sort=True, dropna=False):
        if rows[comparison.vary].nunique() < 2:
            continue
        label = " · ".join(f"{name} {value}" if name in ("view",) else str(value)
                           for name, value in zip(comparison.fixed, values)
                           if not (name == "view" and value == ""))
        order = rows[comparison.vary].map(lambda v: (v not in BASELINES, str(v)))
        groups.append((label, rows.iloc[np.argsort(order.to_numpy(), kind="stable")]))
    return groups


def comparison_rows(rows: pd.DataFrame, vary: str) -> list[list]:
    """Cells of one group: the varied value, CV objective, fold spreads, held-out metrics."""
    cells = []
    for row in rows.to_dict("records"):
        cells.append([row[vary] if row[vary] != "" else "whole table",
                      row.get("cv_score"),
                      *(_spread_text(row.get(f"cv_{name}")) for name in FOLD_METRICS),
                      row.get("accuracy"), row.get("balanced_accuracy"), row.get("roc_auc")])
    return cells


COMPARISON_COLUMNS = ("compared", "CV objective",
                      *(f"CV {name.replace('_', ' ')} (folds)" for name in FOLD_METRICS),
                      "held-out accuracy", "held-out balanced accuracy", "held-out ROC AUC")


def _spread_text(spread) -> str:
    if not spread:
        return "-"
    mean, std, folds = spread
    return f"{mean:.3f} ± {std:.3f} (k={folds})"


def search_tables(results: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """``(metric, classes x (table, k) precision@k)`` per metric of ``search_eval.parquet``."""
    from pipelines.similar.evaluate import comparison_table

    if results.empty:
        return []
    metric = results["metric"] if "metric" in results else pd.Series("cosine", index=results.index)
    return [(str(name), comparison_table(part)) for name, part in results.groupby(metric)]
