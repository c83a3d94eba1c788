"""What the HTTP endpoints do, without HTTP: one per server process.

Uploads go through a :class:`Batcher`: one thread owns the
:class:`~pipelines.ingest.session.IngestSession` (backbones and heads loaded
once), takes every upload waiting when it is free and ingests them together,
so concurrent uploads share one backbone call per table.
"""

from __future__ import annotations

import io
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from featurestore import FeatureStoreError, Store
from featurestore.manifest import Manifest
from pipelines.ingest.session import IngestSession, Outcome
from pipelines.serve.searchers import Searchers

THUMBNAIL_PX = 128
#: Most uploads ingested together (bounds one batch's latency).
MAX_BATCH = 32


class NotFound(FeatureStoreError):
    """An image id or table the store does not have (HTTP 404)."""


class Batcher:
    """Ingest uploads on one thread, in batches of whatever is waiting."""

    def __init__(self, session: IngestSession):
        self.session = session
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="ingest", daemon=True)
        self._thread.start()

    def submit(self, file: Path, name: str, label: str | None) -> Future:
        future: Future = Future()
        self._queue.put((file, name, label, future))
        return future

    def _run(self) -> None:
        while True:
            items = [self._queue.get()]
            while len(items) < MAX_BATCH:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            for label in dict.fromkeys(item[2] for item in items):
                group = [item for item in items if item[2] == label]
                try:
                    outcomes = self.session.ingest([(f, n) for f, n, _, _ in group],
                                                   label=label)
                except BaseException as err:  # each waiting request gets the error
                    for *_, future in group:
                        future.set_exception(err)
                    continue
                for (*_, future), outcome in zip(group, outcomes):
                    future.set_result(outcome)


@dataclass
class Service:
    store: Store
    batcher: Batcher
    searchers: Searchers

    @classmethod
    def open(cls, store: str | Path) -> Service:
        session = IngestSession.open(store)
        session.warm()  # the first upload must not pay for the backbone
        _remove_partial_uploads(session.store.paths.ingested)
        return cls(session.store, Batcher(session), Searchers(session.store))

    @property
    def session(self) -> IngestSession:
        return self.batcher.session

    def image(self, image_id: str) -> dict:
        """The manifest row (ingested or scanned) and the scores of ``image_id``."""
        with Manifest(self.store.paths.manifest, create=True) as manifest:
            rows = manifest.ingested([image_id])
            source = "ingested"
            if rows.empty:
                scanned = manifest.images()
                rows = scanned[scanned["image_id"] == image_id].drop(columns=["raw_path"])
                source = "scan"
        if rows.empty:
            raise NotFound(f"No image {image_id!r} in store {self.store.root}.")
        record = _records(rows.head(1))[0]
        return {"image_id": image_id, "source": source, "manifest": record,
                "scores": self.scores(image_id)}

    def scores(self, image_id: str) -> dict:
        frame = self.store.scores(image_ids=[image_id])
        out = {}
        for row in _records(frame):
            proba = {k[len("proba_"):]: v for k, v in row.items()
                     if k.startswith("proba_") and v is not None}
            out[row["model"]] = {"proba": proba, "predicted": row["predicted"],
                                 "threshold": row["threshold"],
                                 "model_version": row["model_version"],
                                 "scored_at": row["scored_at"]}
        return out

    def similar(self, image_id: str, table: str, k: int) -> list[dict]:
        """``featurestore search`` of the stored image, with similarity and thumbnail URL."""
        try:
            frame = self.searchers.search(table, image_id, k)
        except FeatureStoreError as err:
            raise NotFound(str(err)) from err
        frame["similarity"] = 1.0 - frame["distance"]
        frame["thumbnail"] = [f"/v1/images/{i}/thumbnail" for i in frame["image_id"]]
        return _records(frame)

    def neighbours(self, image_id: str, k: int = 5) -> dict:
        return {lin.key: self.similar(image_id, lin.key, k) for lin in self.session.lineages}

    def thumbnail(self, image_id: str) -> bytes:
        """A PNG at most :data:`THUMBNAIL_PX` a side of the stored image."""
        from PIL import Image

        with Image.open(self._file_of(image_id)) as image:
            image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            buffer = io.BytesIO()
            image.convert("RGB" if image.mode not in ("L", "RGB") else image.mode).save(
                buffer, format="PNG")
        return buffer.getvalue()

    def _file_of(self, image_id: str) -> Path:
        with Manifest(self.store.paths.manifest, create=True) as manifest:
            rows = manifest.ingested([image_id])
            if not rows.empty:
                return self.store.paths.ingested / rows.iloc[0]["file"]
            scanned = manifest.images()
            match = scanned[scanned["image_id"] == image_id]
            if match.empty:
                raise NotFound(f"No image {image_id!r} in store {self.store.root}.")
            return manifest.absolute_path(match.iloc[0])

    def ingest(self, file: Path, name: str, label: str | None) -> Outcome:
        return self.batcher.submit(file, name, label).result()


def _records(frame: pd.DataFrame) -> list[dict]:
    """Rows as JSON-ready dicts (NaN as None)."""
    return frame.astype(object).where(frame.notna(), None).to_dict("records")


def _remove_partial_uploads(folder: Path) -> None:
    """Uploads (and copies) that a killed server was receiving: only ever our own names."""
    from featurestore._io import remove_tmp_files
    from pipelines.serve.uploads import PARTIAL_PREFIX

    if folder.is_dir():
        remove_tmp_files(folder)
        for partial in folder.glob(f"{PARTIAL_PREFIX}*"):
            partial.unlink(missing_ok=True)
