"""The review page at ``/``: upload a scan, and review the latest audit's suspects.

Server-rendered (Jinja2, the project's ``base.html``) plus ``static/review.js``;
no build step. Saving the decisions writes them, exactly as a reviewer would
edit ``suspects.csv``, to a ``review-<time>.csv`` inside the audit's run
folder and stores it with ``audit-labels --apply`` (:func:`run_audit_labels`):
same checks, same view, who/when/why, a new revision each time. The page
shows each suspect's decision in the view's newest revision, so a save keeps
the earlier ones.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from fastapi import APIRouter, Body
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from featurestore import FeatureStoreError
from featurestore._io import write_csv
from featurestore.views import ViewStore
from pipelines.html import environment

#: Suspects shown on the page, worst first.
MAX_SUSPECTS = 50
DEFAULT_VIEW = "reviewed"


def latest_audit(store, key: str) -> Path | None:
    """The newest audit run folder of table ``key`` (by its run.json), or None."""
    runs = [p.parent for p in store.paths.audits_of(key).glob("*/run.json")]
    if not runs:
        return None
    return max(runs, key=lambda p: (json.loads((p / "run.json").read_text())["created_at"],
                                    p.name))


def review_router(service, settings) -> APIRouter:
    from pipelines.serve.app import token_check

    router = APIRouter()
    reads, writes = token_check(settings, write=False), token_check(settings, write=True)

    @router.get("/", response_class=HTMLResponse, dependencies=[reads])
    def page(view: str = DEFAULT_VIEW) -> str:
        audits = [_audit_context(service, lin.key, view) for lin in service.session.lineages]
        return environment("pipelines.serve").get_template("review.html").render(
            audits=[a for a in audits if a], view=view, needs_token=bool(settings.token))

    @router.post("/v1/reviews", dependencies=[writes])
    def save(table: str = Body(...), view: str = Body(...), who: str = Body(...),
             decisions: list[dict] = Body(...)) -> dict:
        """Store the page's decisions as ``view`` (exactly ``audit-labels --apply``)."""
        return _apply(service, table, view, who, decisions)

    return router


def mount_static(app) -> None:
    app.mount("/static", StaticFiles(packages=[("pipelines.serve", "static")]), name="static")


def _audit_context(service, key: str, view: str) -> dict | None:
    run = latest_audit(service.store, key)
    if run is None:
        return None
    suspects = pd.read_parquet(run / "suspects.parquet").sort_values("rank").head(MAX_SUSPECTS)
    current = _current_decisions(service.store, view)
    rows = []
    for suspect in suspects.to_dict("records"):
        decided = current.get(suspect["image_id"], {})
        rows.append({**suspect, "decision": decided.get("action", ""),
                     "new_label": decided.get("new_label") or "",
                     "reason": decided.get("why", ""),
                     "neighbours": _safe_neighbours(service, suspect["image_id"], key)})
    return {"table": key, "run": run.name, "suspects": rows}


def _current_decisions(store, view: str) -> dict[str, dict]:
    try:
        decisions = ViewStore(store).get(view).decisions
    except FeatureStoreError:
        return {}
    return {row["image_id"]: row for row in decisions.to_dict("records")}


def _safe_neighbours(service, image_id: str, key: str) -> list[dict]:
    try:
        return service.similar(image_id, key, 4)
    except FeatureStoreError:
        return []


def _apply(service, table: str, view: str, who: str, decisions: list[dict]) -> dict:
    from pipelines.audit.run import AuditLabelsConfig, run_audit_labels
    from pipelines.serve.uploads import UploadRejected

    key = service.store.resolve(table).key
    run = latest_audit(service.store, key)
    if run is None:
        raise UploadRejected(422, f"table {key} has no audit to review")
    columns = ["image_id", "decision", "new_label", "reason"]
    frame = pd.DataFrame([{c: str(d.get(c) or "") for c in columns} for d in decisions],
                         columns=columns)
    reviewed = run / f"review-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%fZ}.csv"
    write_csv(frame, reviewed)
    messages: list[str] = []
    try:
        result = run_audit_labels(AuditLabelsConfig(
            store=service.store.root, table=key, apply=reviewed, view=view,
            author=who or None, replace=True), echo=messages.append)
    except FeatureStoreError as err:
        raise UploadRejected(422, str(err)) from err
    return {"view": result.view.name, "revision": result.view.revision,
            "counts": result.view.counts(), "message": " ".join(messages)}
