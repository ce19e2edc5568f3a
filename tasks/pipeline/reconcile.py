"""Coverage reconciler: products whose latest version lacks output of the active model versions.

A product needs work again when its latest version has no listing from the active vlm version,
no embedding from the active clip version (a model changed, a persist was lost), or its job died
(pending/running without progress for too long, or failed with a retryable error). Products
with a fresh job in flight, or a permanent failure, are left alone.

``find_incomplete_products`` and ``requeue`` are plain functions; the periodic Celery task only
takes an advisory lock, calls them in one transaction, and dispatches after the commit.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from db.engine import set_system_scope

# Twice the default hard task time limit (900 s): a job untouched that long has no live worker.
DEFAULT_STALLED_AFTER = timedelta(minutes=30)
ADVISORY_LOCK_KEY = 0x5EC0_C0DE  # one reconciler at a time across all beat/worker processes


class Reason(StrEnum):
    job_stalled = "job_stalled"
    job_failed_retryable = "job_failed_retryable"
    missing_listing = "missing_listing"
    missing_embedding = "missing_embedding"


@dataclass(frozen=True)
class IncompleteProduct:
    tenant_id: str
    product_id: int
    external_id: str
    product_version: int
    reason: Reason
    job_id: int | None
    job_stage: str | None


@dataclass(frozen=True)
class Redispatch:
    """A job to (re)start at ``stage`` once the transaction that prepared it has committed."""

    job_id: int
    stage: str


# Built on catalog.enrichment_status (migration 0002): one row per product at its latest version.
_CLASSIFIED = """
    SELECT s.tenant_id, s.product_id, s.external_id, s.product_version, s.job_id, s.job_stage,
           CASE
             WHEN s.job_status IN ('pending', 'running') AND s.job_updated_at < now() - :stalled
               THEN 'job_stalled'
             WHEN s.job_status IN ('pending', 'running') THEN 'in_flight'
             WHEN s.job_status = 'failed' AND s.retryable THEN 'job_failed_retryable'
             WHEN s.job_status = 'failed' THEN 'failed_permanently'
             WHEN s.has_listing IS FALSE THEN 'missing_listing'
             WHEN s.has_embedding IS FALSE THEN 'missing_embedding'
             ELSE 'complete'
           END AS reason
    FROM catalog.enrichment_status s
"""


def find_incomplete_products(session: Session, *, stalled_after: timedelta = DEFAULT_STALLED_AFTER,
                             limit: int = 1000, tenant_id: str | None = None) -> list[IncompleteProduct]:
    """Products to re-queue, oldest product id first."""
    rows = session.execute(
        text(f"SELECT * FROM ({_CLASSIFIED}) c WHERE c.reason = ANY(CAST(:reasons AS text[])) "
             "AND (CAST(:tenant AS text) IS NULL OR c.tenant_id = CAST(:tenant AS text)) "
             "ORDER BY c.product_id LIMIT :limit"),
        {"stalled": stalled_after, "reasons": [r.value for r in Reason], "tenant": tenant_id, "limit": limit},
    )
    return [IncompleteProduct(r.tenant_id, r.product_id, r.external_id, r.product_version, Reason(r.reason),
                              r.job_id, r.job_stage) for r in rows]


def coverage_counts(session: Session, *, stalled_after: timedelta = DEFAULT_STALLED_AFTER) -> dict[str, int]:
    """Products by reconciler class (``enrich status``): complete, in_flight, each Reason, failed_permanently."""
    counts = dict(session.execute(
        text(f"SELECT c.reason, count(*) FROM ({_CLASSIFIED}) c GROUP BY c.reason"), {"stalled": stalled_after},
    ).tuples().all())
    keys = ["products", "complete", "in_flight", *[r.value for r in Reason], "failed_permanently"]
    out = {k: int(counts.get(k, 0)) for k in keys}
    out["products"] = sum(int(v) for v in counts.values())
    return out


def requeue(session: Session, item: IncompleteProduct) -> Redispatch | None:
    """Prepare ``item`` for another run (flush only). Stalled job: release its stage claim so a new
    task may take it. Otherwise: a new job for the same product version, caused by a synthetic
    ``reconcile`` inbox event, with the image URLs of the last job. None when nothing to run from."""
    if item.reason is Reason.job_stalled and item.job_id is not None:
        stage = item.job_stage or "fetch"
        released = session.execute(
            text("UPDATE enrichment_jobs SET work = jsonb_set(work, '{claims}', "
                 "coalesce(work -> 'claims', '{}'::jsonb) - CAST(:stage AS text)), updated_at = now() "
                 "WHERE id = :id AND status IN ('pending', 'running') RETURNING id"),
            {"id": item.job_id, "stage": stage},
        ).scalar_one_or_none()
        return Redispatch(item.job_id, stage) if released is not None else None
    work = session.execute(
        text("SELECT work FROM enrichment_jobs WHERE product_id = :p AND product_version = :v "
             "AND work ? 'image_urls' ORDER BY id DESC LIMIT 1"),
        {"p": item.product_id, "v": item.product_version},
    ).scalar_one_or_none()
    if work is None:
        return None
    event_id = uuid.uuid4()
    session.execute(
        text("INSERT INTO inbox_events (event_id, tenant_id, event_type, status, detail) "
             "VALUES (:e, :t, 'reconcile', 'accepted', :d)"),
        {"e": event_id, "t": item.tenant_id, "d": f"{item.reason.value} (product version {item.product_version})"},
    )
    job_id = session.execute(
        text("INSERT INTO enrichment_jobs (tenant_id, event_id, product_id, product_version, status, work) "
             "VALUES (:t, :e, :p, :v, 'pending', CAST(:w AS jsonb)) RETURNING id"),
        {"t": item.tenant_id, "e": event_id, "p": item.product_id, "v": item.product_version,
         "w": _json({"image_urls": work["image_urls"], "reconciled": item.reason.value})},
    ).scalar_one()
    return Redispatch(int(job_id), "fetch")


def reconcile(session: Session, *, stalled_after: timedelta = DEFAULT_STALLED_AFTER,
              limit: int = 1000) -> list[Redispatch]:
    """One pass under a transaction-scoped advisory lock; returns what to dispatch after commit.
    Cross-tenant by nature: the transaction runs in the system scope (row-level security)."""
    set_system_scope(session)
    if not session.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": ADVISORY_LOCK_KEY}).scalar_one():
        return []
    out = []
    for item in find_incomplete_products(session, stalled_after=stalled_after, limit=limit):
        if (dispatch := requeue(session, item)) is not None:
            out.append(dispatch)
    session.flush()
    return out


def _json(value: dict[str, Any]) -> str:
    import json

    return json.dumps(value)


def _register_task() -> Any:
    """The Celery adapter, when the pipeline's task base is installed (it is in a full checkout)."""
    try:
        from tasks.adapter import catalog_task
    except ModuleNotFoundError:  # pragma: no cover - a db-only install
        return None
    from celery import Task

    @catalog_task("reconcile", queue="cpu", ignore_result=True)
    def reconcile_task(self: Task, limit: int = 1000) -> int:
        from db.engine import session_scope
        from tasks.pipeline import tasks as stages
        from tasks.runtime import get_runtime

        runtime = get_runtime()
        with session_scope(runtime.session_factory) as session:
            dispatches = reconcile(session, limit=limit)
        by_stage = {"fetch": stages.fetch, "model": stages.model, "persist": stages.persist_listing}
        for d in dispatches:
            by_stage.get(d.stage, stages.fetch).delay(d.job_id)
        return len(dispatches)

    return reconcile_task


reconcile_task = _register_task()
