"""Named cleaned views of a store: reviewed label decisions, never moved or deleted images.

A view is a list of decisions keyed by ``image_id`` (the SHA-256 of the image
file), so one view serves every table of the store alike: max- and avg-pooled
tables, and augmented tables whose extra rows share their image's id. Tables
are never rewritten; :func:`apply_view` filters and relabels the arrays a
reader returned.

Storage: ``STORE/views.sqlite``::

    views      name, revision, created_at, author, covers_heldout, source (JSON), digest
    decisions  name, revision, image_id, action (keep/relabel/drop), new_label,
               who, decided_at, why

Creating a view under an existing name is refused unless ``replace=True``,
which adds a new *revision*: the newest revision is the one used, and the
older decisions stay readable (``get(name, revision=1)``). Nothing is ever
deleted. ``covers_heldout`` says that the reviewer explicitly audited held-out
images too; only such a view may hold decisions on them, and only such a view
changes the held-out split when heads are evaluated.

Storage only: numpy, pandas and sqlite3.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from featurestore import _sqlite
from featurestore._io import utc_now
from featurestore.errors import FeatureStoreError
from featurestore.reader import FeatureArrays
from featurestore.store import Store

ACTIONS = ("keep", "relabel", "drop")
#: Columns of a view's decisions frame.
DECISION_COLUMNS = ("image_id", "action", "new_label", "who", "decided_at", "why")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS views (
    name TEXT NOT NULL, revision INTEGER NOT NULL, created_at TEXT NOT NULL,
    author TEXT NOT NULL, covers_heldout INTEGER NOT NULL, source TEXT NOT NULL,
    digest TEXT NOT NULL, PRIMARY KEY (name, revision));
CREATE TABLE IF NOT EXISTS decisions (
    name TEXT NOT NULL, revision INTEGER NOT NULL, image_id TEXT NOT NULL,
    action TEXT NOT NULL CHECK (action IN ('keep', 'relabel', 'drop')),
    new_label TEXT, who TEXT NOT NULL, decided_at TEXT NOT NULL, why TEXT NOT NULL,
    PRIMARY KEY (name, revision, image_id));
"""


def check_view_name(name: str) -> str:
    """``name`` if it is a valid view name (it becomes part of model folder names)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", ".."):
        raise FeatureStoreError(f"View name must match [A-Za-z0-9_.-]+ (letters, digits, "
                                f"'_', '.', '-'); got {name!r}.")
    return name


@dataclass(frozen=True)
class View:
    """One revision of a named view."""

    name: str
    revision: int
    created_at: str
    author: str
    covers_heldout: bool
    """True when held-out images were audited explicitly; only then are they changed."""
    source: dict
    """Where the decisions came from: audit run, table key, heads, method, file."""
    decisions: pd.DataFrame
    """One row per image: :data:`DECISION_COLUMNS`."""

    @property
    def digest(self) -> str:
        """SHA-256 of what changes training (drops, relabels, held-out coverage)."""
        return decisions_digest(self.decisions, self.covers_heldout)

    def dropped(self) -> set[str]:
        return set(self.decisions.loc[self.decisions["action"] == "drop", "image_id"])

    def relabels(self) -> dict[str, str]:
        rows = self.decisions[self.decisions["action"] == "relabel"]
        return dict(zip(rows["image_id"], rows["new_label"]))

    def counts(self) -> dict[str, int]:
        """Decisions per action: ``{"keep": .., "relabel": .., "drop": ..}``."""
        found = self.decisions["action"].value_counts()
        return {action: int(found.get(action, 0)) for action in ACTIONS}


def decisions_digest(decisions: pd.DataFrame, covers_heldout: bool) -> str:
    effective = decisions[decisions["action"] != "keep"].sort_values("image_id")
    payload = json.dumps([bool(covers_heldout)] + [
        [i, a, n or ""] for i, a, n in zip(effective["image_id"], effective["action"],
                                           effective["new_label"])])
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class ViewEffect:
    """What :func:`apply_view` changed in one set of arrays."""

    dropped_rows: int
    dropped_images: int
    relabelled_rows: int
    relabelled_images: int

    def describe(self) -> str:
        return (f"dropped {self.dropped_images} images ({self.dropped_rows} rows), "
                f"relabelled {self.relabelled_images} images ({self.relabelled_rows} rows)")


def apply_view(arrays: FeatureArrays, view: View) -> tuple[FeatureArrays, ViewEffect]:
    """The arrays with the view's dropped images removed and relabelled images relabelled.

    Every row of an image follows its decision, augmented views included (they
    share its ``image_id``). The input arrays are not modified.
    """
    image_id = np.asarray(arrays.ids["image_id"]).astype(str)
    drop = np.isin(image_id, list(view.dropped()))
    relabels = view.relabels()
    relabel = np.isin(image_id, list(relabels)) & ~drop
    y = np.array(arrays.y, dtype=object)
    y[relabel] = [relabels[i] for i in image_id[relabel]]
    keep = ~drop
    new_y = y[keep].astype(str) if len(y) else np.asarray(arrays.y)
    result = FeatureArrays(arrays.X[keep], new_y, arrays.ids[keep], arrays.groups[keep])
    effect = ViewEffect(int(drop.sum()), len(set(image_id[drop])), int(relabel.sum()),
                        len(set(image_id[relabel])))
    return result, effect


class ViewStore:
    """The views of one store (``STORE/views.sqlite``)."""

    def __init__(self, store: str | Path | Store):
        self.path = Store.of(store, create=False).paths.views

    def _connect(self) -> sqlite3.Connection:
        return _sqlite.connect(self.path, schema=_SCHEMA)

    def names(self) -> list[str]:
        if not self.path.exists():
            return []
        with closing(self._connect()) as conn:
            return [r[0] for r in conn.execute("SELECT DISTINCT name FROM views ORDER BY name")]

    def list(self) -> pd.DataFrame:
        """One row per view (its newest revision): name, revision, created_at, author,
        covers_heldout, keep, relabel, drop, source."""
        rows = []
        for name in self.names():
            view = self.get(name)
            rows.append({"name": name, "revision": view.revision,
                         "created_at": view.created_at, "author": view.author,
                         "covers_heldout": view.covers_heldout, **view.counts(),
                         "source": json.dumps(view.source, sort_keys=True)})
        return pd.DataFrame(rows, columns=["name", "revision", "created_at", "author",
                                           "covers_heldout", *ACTIONS, "source"])

    def get(self, name: str, revision: int | None = None) -> View:
        """The newest revision of view ``name`` (or revision ``revision``)."""
        check_view_name(name)
        with closing(self._connect()) as conn:
            sql = "SELECT * FROM views WHERE name = ?"
            params: tuple = (name,)
            if revision is not None:
                sql, params = sql + " AND revision = ?", (name, revision)
            row = conn.execute(sql + " ORDER BY revision DESC LIMIT 1", params).fetchone()
            if row is None:
                known = ", ".join(self.names()) or "none yet (featurestore audit-labels "\
                    "--accept-top K --view NAME, or --apply FILE --view NAME)"
                which = f"{name!r}" + (f" revision {revision}" if revision else "")
                raise FeatureStoreError(f"Unknown view {which} in {self.path.parent}. "
                                        f"Views: {known}.")
            decisions = pd.read_sql_query(
                f"SELECT {', '.join(DECISION_COLUMNS)} FROM decisions WHERE name = ? AND "
                "revision = ? ORDER BY image_id", conn, params=(name, row[1]))
        return View(row[0], int(row[1]), row[2], row[3], bool(row[4]), json.loads(row[5]),
                    decisions)

    def refuse_existing(self, name: str) -> None:
        """Raise if view ``name`` exists (to fail before any costly work)."""
        if self.path.exists():
            with closing(self._connect()) as conn:
                last = self._last_revision(conn, name)
            if last is not None:
                raise self._exists_error(name, last)

    @staticmethod
    def _last_revision(conn, name: str) -> int | None:
        return conn.execute("SELECT MAX(revision) FROM views WHERE name = ?",
                            (name,)).fetchone()[0]

    def _exists_error(self, name: str, last: int) -> FeatureStoreError:
        return FeatureStoreError(
            f"View {name!r} already exists (revision {last}) in {self.path.parent}; choose "
            f"another name, or replace it (--replace adds a new revision; the old decisions "
            f"are kept).")

    def create(self, name: str, decisions: pd.DataFrame, *, author: str, source: dict,
               covers_heldout: bool = False, replace: bool = False) -> View:
        """Store ``decisions`` (:data:`DECISION_COLUMNS`; who/decided_at/why may be
        missing, filled from ``author`` and now) as view ``name``.

        An existing name is refused unless ``replace``, which adds a revision and
        keeps the older ones.
        """
        check_view_name(name)
        frame = _normalise(decisions, author)
        # BEGIN IMMEDIATE: one creator at a time picks the next revision.
        with closing(self._connect()) as conn, _sqlite.transaction(conn):
            last = self._last_revision(conn, name)
            if last is not None and not replace:
                raise self._exists_error(name, last)
            revision = (last or 0) + 1
            conn.execute("INSERT INTO views VALUES (?, ?, ?, ?, ?, ?, ?)", (
                name, revision, utc_now(), author, int(covers_heldout),
                json.dumps(source, sort_keys=True, default=str),
                decisions_digest(frame, covers_heldout)))
            conn.executemany("INSERT INTO decisions VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [
                (name, revision, *row) for row in frame.itertuples(index=False)])
        return self.get(name, revision)


def _normalise(decisions: pd.DataFrame, author: str) -> pd.DataFrame:
    """Decisions with every column, checked: known actions, one row per image."""
    frame = decisions.copy()
    missing = [c for c in ("image_id", "action") if c not in frame]
    if missing:
        raise FeatureStoreError(f"Decisions lack column(s) {missing}; need "
                                f"{', '.join(DECISION_COLUMNS)}.")
    defaults = {"new_label": None, "who": author, "decided_at": utc_now(), "why": ""}
    for column, value in defaults.items():
        if column not in frame:
            frame[column] = value
        if column != "new_label":
            frame[column] = frame[column].where(frame[column].notna() & (frame[column] != ""),
                                                value).astype(str)
    bad = frame[~frame["action"].isin(ACTIONS)]
    if len(bad):
        raise FeatureStoreError(f"Unknown action {bad['action'].iloc[0]!r} for image "
                                f"{bad['image_id'].iloc[0]}; allowed: {', '.join(ACTIONS)}.")
    twice = frame["image_id"][frame["image_id"].duplicated()]
    if len(twice):
        raise FeatureStoreError(f"Image {twice.iloc[0]} has more than one decision.")
    relabel = frame["action"] == "relabel"
    if frame.loc[relabel, "new_label"].isna().any():
        raise FeatureStoreError("A relabel decision lacks its new_label.")
    frame.loc[~relabel, "new_label"] = None
    return frame[list(DECISION_COLUMNS)]
