"""What the HTTP endpoints do, without HTTP: one per server process.

Uploads go through a :class:`Batcher`: one thread takes every upload waiting
when it is free and ingests them together, so concurrent uploads share one
backbone call per table. The ingest session (backbones and heads loaded once)
is reopened when the store gains or loses a table or a model (a cheap
signature, checked per upload and per listing), so a server sees a new
``extract`` or ``fit-heads`` without a restart. A table whose backbone cannot
be built (its weights file is missing, say) or a model that cannot be loaded
does not stop the server: reads and searches go on, ``/healthz`` and
``/v1/tables`` name what is unavailable and why, and uploads are refused (503)
until it is fixed, since an upload must reach every table and model (an image
left without a row in one table would never get it: it is known from then on).
"""

from __future__ import annotations

import io
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from featurestore import FeatureStoreError, Store
from featurestore.manifest import Manifest
from pipelines.ingest.session import IngestSession, Outcome
from pipelines.serve.searchers import Searchers, frame_records

THUMBNAIL_PX = 128
#: Most uploads ingested together (bounds one batch's latency).
MAX_BATCH = 32
#: Longest wait of a batch, after its first upload, for uploads still being received
#: (group commit): clients answered together send again some ms apart, and without
#: the wait the first one went alone (bench_serve, 8 clients: 3.6 uploads a batch).
BATCH_WAIT_S = 0.25
#: Age after which a temporary in ``ingested/`` counts as abandoned: a writer alive
#: (an upload being received, a CLI ingest's copy) touches its file far more often.
ABANDONED_AFTER_S = 15 * 60


class NotFound(FeatureStoreError):
    """An image id or table the store does not have (HTTP 404)."""


class Unavailable(FeatureStoreError):
    """Uploads cannot be ingested now: a table or model cannot be loaded (HTTP 503)."""


class Batcher:
    """Ingest uploads on one thread, in batches of whatever is waiting."""

    def __init__(self, session_of: Callable[[], IngestSession]):
        self.session_of = session_of
        self._queue: queue.Queue = queue.Queue()
        self.batches = self.uploads = 0
        """Batches ingested and the uploads in them (``uploads / batches``: mean batch)."""
        self._coming, self._lock = 0, threading.Lock()
        self._thread = threading.Thread(target=self._run, name="ingest", daemon=True)
        self._thread.start()

    @contextmanager
    def coming(self) -> Iterator[list]:
        """Around receiving an upload: a batch that starts meanwhile waits for it (up to
        :data:`BATCH_WAIT_S`) unless it is refused first. Pass the ticket to :meth:`submit`."""
        ticket = [False]
        with self._lock:
            self._coming += 1
        try:
            yield ticket
        finally:
            self._arrived(ticket)

    def _arrived(self, ticket: list | None) -> None:
        with self._lock:
            if ticket is not None and not ticket[0]:
                ticket[0] = True
                self._coming -= 1

    def submit(self, file: Path, name: str, label: str | None,
               ticket: list | None = None) -> Future:
        future: Future = Future()
        self._queue.put((file, name, label, future))
        self._arrived(ticket)  # after the put: a waiting batch then finds it
        return future

    def _run(self) -> None:
        while True:
            items = self._gather()
            self.batches, self.uploads = self.batches + 1, self.uploads + len(items)
            for label in dict.fromkeys(item[2] for item in items):
                group = [item for item in items if item[2] == label]
                try:
                    outcomes = self.session_of().ingest([(f, n) for f, n, _, _ in group],
                                                        label=label)
                except BaseException as err:  # each waiting request gets the error
                    for *_, future in group:
                        future.set_exception(err)
                    continue
                for (*_, future), outcome in zip(group, outcomes):
                    future.set_result(outcome)

    def _gather(self) -> list:
        """The next batch: every upload queued, and those still being received (up to
        :data:`BATCH_WAIT_S`)."""
        items, deadline = [self._queue.get()], time.monotonic() + BATCH_WAIT_S
        while len(items) < MAX_BATCH:
            try:
                items.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            if not self._coming or time.monotonic() >= deadline:
                return items
            try:
                items.append(self._queue.get(timeout=0.005))
            except queue.Empty:
                pass
        return items


def store_signature(store: Store) -> tuple:
    """Names of the store's tables and saved models: two folder listings, no file read."""
    from pipelines.heads.models import MODEL_JSON
    from featurestore.paths import LINEAGE_FILE

    return (tuple(sorted(str(p) for p in store.paths.tables.glob(f"*/{LINEAGE_FILE}"))),
            tuple(sorted(str(p) for p in store.paths.models.glob(f"*/*/{MODEL_JSON}"))))


@dataclass
class Sessions:
    """The current ingest session of a store, reopened when its tables or models change."""

    store: Store
    unavailable: dict[str, str] = field(default_factory=dict)
    """``{"table KEY" or "model NAME": reason}`` of what the session could not load."""
    _session: IngestSession | None = None
    _signature: tuple | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def current(self) -> IngestSession:
        signature = store_signature(self.store)
        with self._lock:
            if signature != self._signature or self._session is None:
                self._signature = signature
                try:
                    session = IngestSession.open(self.store)
                except FeatureStoreError as err:  # at start, a store without tables
                    if self._session is None:
                        raise
                    self.unavailable = {"store": str(err)}
                    return self._session
                if self._session is not None:  # heads loaded already stay loaded
                    session._models.update(self._session._models)
                self._session, self.unavailable = session, session.warm_each()
            return self._session

    def ready(self) -> IngestSession:
        """The current session, its backbones and heads retried if some failed to load;
        :class:`Unavailable` naming them if they still fail."""
        session = self.current()
        with self._lock:
            if self.unavailable and "store" not in self.unavailable:
                self.unavailable = session.warm_each()
            if self.unavailable:
                raise Unavailable("uploads are refused until these load: " + "; ".join(
                    f"{what}: {why}" for what, why in self.unavailable.items()))
        return session


@dataclass
class Service:
    store: Store
    sessions: Sessions
    batcher: Batcher
    searchers: Searchers

    @classmethod
    def open(cls, store: str | Path) -> Service:
        sessions = Sessions(Store.of(store, create=False))
        sessions.current()  # backbones built now: the first upload must not pay for them
        remove_abandoned_uploads(sessions.store.paths.ingested)
        return cls(sessions.store, sessions, Batcher(sessions.ready), Searchers(sessions.store))

    @property
    def session(self) -> IngestSession:
        return self.sessions.current()

    def health(self) -> dict:
        self.sessions.current()
        unavailable = dict(self.sessions.unavailable)
        return {"ok": True, "uploads": not unavailable, "unavailable": unavailable,
                "ingest_batches": self.batcher.batches,
                "ingested_uploads": self.batcher.uploads}

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
        record = frame_records(rows.head(1))[0]
        return {"image_id": image_id, "source": source, "manifest": record,
                "scores": self.scores(image_id)}

    def scores(self, image_id: str) -> dict:
        frame = self.store.scores(image_ids=[image_id])
        out = {}
        for row in frame_records(frame):
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
            found = self.searchers.records(table, image_id, k)
        except FeatureStoreError as err:
            raise NotFound(str(err)) from err
        for neighbour in found:
            neighbour["similarity"] = 1.0 - neighbour["distance"]
            neighbour["thumbnail"] = f"/v1/images/{neighbour['image_id']}/thumbnail"
        return found

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

    def ingest(self, file: Path, name: str, label: str | None,
               ticket: list | None = None) -> Outcome:
        return self.batcher.submit(file, name, label, ticket).result()


def remove_abandoned_uploads(folder: Path, older_than: float = ABANDONED_AFTER_S) -> int:
    """Remove the uploads and copies that a killed server or ingest left in ``folder``:
    only our own temporary names, and only those untouched for ``older_than`` seconds,
    since another process (a CLI ingest, a second server) may be writing the others."""
    from featurestore._io import TMP_PREFIX
    from pipelines.serve.uploads import PARTIAL_PREFIX

    if not folder.is_dir():
        return 0
    removed, cutoff = 0, time.time() - older_than
    for entry in folder.iterdir():
        try:
            if entry.name.startswith((TMP_PREFIX, PARTIAL_PREFIX)) and \
                    entry.stat().st_mtime < cutoff:
                entry.unlink()
                removed += 1
        except FileNotFoundError:
            pass  # its writer renamed or removed it meanwhile
    return removed
