"""The leaderboard: one row per (table, head, objective, view), across every fit-heads run.

Kept as ``STORE/leaderboard.parquet`` so heads can be compared across tables
(densenet121/max vs /avg, raw vs augmented tables). Each run replaces its own
rows and keeps everyone else's; the file is rewritten atomically under a file
lock, so parallel ``fit-heads`` processes never lose each other's rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from filelock import FileLock

from featurestore import Store
from featurestore._io import atomic_write, utc_now

#: Columns identifying a row; a new result replaces the row with the same values.
#: ``view`` is "" for heads trained on the whole table, else the cleaned view's name.
KEY_COLUMNS = ("table_key", "head", "objective", "view")
#: Columns of the printed table, in order.
SHOWN = ("table", "head", "view", "objective", "cv_score", "eval_split", "accuracy",
         "balanced_accuracy", "roc_auc", "f1_macro", "recall", "specificity", "threshold",
         "trials", "sec_per_trial", "refit_sec", "sec_per_epoch")


def read_leaderboard(store: str | Path | Store) -> pd.DataFrame:
    """The whole leaderboard, best cross-validation score first (empty if none yet)."""
    path = Store.of(store, create=False).paths.leaderboard
    if not path.exists():
        return pd.DataFrame(columns=list(KEY_COLUMNS))
    return _with_view(pd.read_parquet(path))


def _with_view(board: pd.DataFrame) -> pd.DataFrame:
    # Boards written before views existed have no view column: every row was the whole table.
    view = board["view"] if "view" in board else pd.Series("", index=board.index)
    return board.assign(view=view.fillna("").astype(str))


def update_leaderboard(store: Store, rows: list[dict]) -> pd.DataFrame:
    """Insert or replace ``rows`` (dicts with at least :data:`KEY_COLUMNS`); returns the board."""
    if not rows:  # a worker whose heads were all refit by other workers
        return read_leaderboard(store)
    path = store.paths.leaderboard
    with FileLock(str(path) + ".lock"):
        board = read_leaderboard(store)
        new = _with_view(pd.DataFrame.from_records(rows))
        if not board.empty:
            keys = pd.MultiIndex.from_frame(new[list(KEY_COLUMNS)].astype(str))
            old = pd.MultiIndex.from_frame(board[list(KEY_COLUMNS)].astype(str))
            board = board[~old.isin(keys)]
        board = new if board.empty else pd.concat([board, new], ignore_index=True)
        board = board.sort_values(["objective", "cv_score"], ascending=[True, False],
                                  ignore_index=True)
        atomic_write(path, lambda tmp: board.to_parquet(tmp, index=False))
    return board


def format_leaderboard(board: pd.DataFrame) -> str:
    """The leaderboard as a fixed-width text table (3 decimals)."""
    if board.empty:
        return "(leaderboard is empty)"
    shown = board.assign(table=board["table"] if "table" in board else board["table_key"])
    columns = [c for c in SHOWN if c in shown]
    return shown[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}",
                                    na_rep="-")


def head_row(lineage, result, objective, eval_split, is_raw,
                     seconds, view: str | None = None) -> dict:
    """The leaderboard row of one fit-heads ``HeadResult``."""
    metrics = result.metrics or {}
    times = result.search.trial_seconds
    return {
        "table_key": lineage.key, "head": result.head, "objective": objective.label,
        "view": view or "", "table": lineage.name,
        "train_raw_rows": int(is_raw.sum()), "train_aug_rows": int((~is_raw).sum()),
        "cv_score": result.search.value, "eval_split": eval_split,
        "accuracy": metrics.get("accuracy"), "balanced_accuracy": metrics.get("balanced_accuracy"),
        "roc_auc": metrics.get("roc_auc"), "f1_macro": metrics.get("f1_macro"),
        "recall": metrics.get("recall"), "specificity": metrics.get("specificity"),
        "threshold": result.threshold, "trials": result.search.n_complete,
        "pruned": result.search.n_pruned, "failed": result.search.n_failed,
        "sec_per_trial": float(np.mean(times)) if times else None,
        "refit_sec": result.refit_seconds, "total_sec": seconds,
        "params": str(result.search.params), "updated_at": utc_now(),
    }
