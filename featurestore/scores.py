"""Scores of ingested images: ``STORE/scores.sqlite``, one row per (image, model, version).

``ingest`` (and the HTTP server, which calls it) writes here what every saved
model says of every new image::

    scores  image_id, model, model_version, classes (JSON), proba (JSON),
            predicted, threshold, scored_at

``model`` is the model's name (``<table key>/<head>[@<view>]``) and
``model_version`` the SHA-256 of its ``model.json``, so a refitted head scores
an image again under its new version while the old scores stay readable.
Writes are ``INSERT OR IGNORE`` inside one transaction per batch: two ingests
of the same image end with one row per key, and a killed one leaves whole
batches only. Storage only: sqlite3 and pandas.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from featurestore import _sqlite
from featurestore._io import utc_now

_SCHEMA = """
CREATE TABLE IF NOT EXISTS scores (
    image_id TEXT NOT NULL, model TEXT NOT NULL, model_version TEXT NOT NULL,
    classes TEXT NOT NULL, proba TEXT NOT NULL, predicted TEXT NOT NULL,
    threshold REAL, scored_at TEXT NOT NULL,
    PRIMARY KEY (image_id, model, model_version));
CREATE INDEX IF NOT EXISTS scores_model ON scores (model);
"""
#: Columns of :func:`read_scores` before the ``proba_<label>`` ones.
COLUMNS = ("image_id", "model", "model_version", "predicted", "threshold", "scored_at")
PROBA_PREFIX = "proba_"


@dataclass(frozen=True)
class Score:
    """What one model says of one image."""

    image_id: str
    model: str
    model_version: str
    classes: Sequence[str]
    proba: Sequence[float]
    predicted: str
    threshold: float | None


def write_scores(path: str | os.PathLike, scores: Iterable[Score]) -> int:
    """Add ``scores`` in one transaction; a key already there is kept. Returns rows added."""
    now = utc_now()
    rows = [(s.image_id, s.model, s.model_version, json.dumps([str(c) for c in s.classes]),
             json.dumps([float(p) for p in s.proba]), str(s.predicted), s.threshold, now)
            for s in scores]
    with closing(_sqlite.connect(path, wal=True, schema=_SCHEMA)) as conn, \
            _sqlite.transaction(conn):
        before = conn.total_changes
        conn.executemany("INSERT OR IGNORE INTO scores VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        return conn.total_changes - before


def read_scores(path: str | os.PathLike, *, model: str | None = None,
                image_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """Scores as a frame: :data:`COLUMNS` then ``proba_<label>`` per class (NaN where a
    model lacks that class), oldest first. An absent file reads as no scores."""
    if not Path(path).exists():
        return pd.DataFrame(columns=list(COLUMNS))
    where, params = [], []
    if model is not None:
        where.append("model = ?")
        params.append(model)
    if image_ids is not None:
        where.append(f"image_id IN ({', '.join('?' * len(image_ids))})")
        params += list(image_ids)
    sql = "SELECT * FROM scores" + (f" WHERE {' AND '.join(where)}" if where else "")
    with closing(_sqlite.connect(path, mode="ro")) as conn:
        frame = pd.read_sql_query(sql + " ORDER BY scored_at, image_id, model", conn,
                                  params=params)
    return _wide(frame)


def _wide(frame: pd.DataFrame) -> pd.DataFrame:
    probas = [dict(zip(json.loads(c), json.loads(p)))
              for c, p in zip(frame["classes"], frame["proba"])]
    wide = pd.DataFrame(probas, index=frame.index).add_prefix(PROBA_PREFIX)
    return pd.concat([frame[list(COLUMNS)], wide.sort_index(axis=1)], axis=1)
