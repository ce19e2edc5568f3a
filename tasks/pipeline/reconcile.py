"""Coverage reconciler: products whose latest version lacks output of the active model versions.

A product needs work again when its latest version has no listing from the active vlm version,
no embedding from the active clip version (a model changed, a persist was lost), or its job died
(stalled, or failed with a retryable error). Products with a job in flight, or a permanent
failure, are left alone.

Stalled, the rule: a task that holds the job's current stage refreshes ``updated_at`` every
``heartbeat_s`` while it runs (``tasks.adapter``), so a claimed stage is stalled once its last
beat is older than ``stalled_after`` (a few beats: its worker is gone). A stage no task holds
(a pending job never claimed, or one handed on and waiting in the next stage's queue) is only
waiting in a queue, which under backlog can take hours; it is stalled after the much longer
``queued_after``. Re-dispatching a job that is in fact alive costs one duplicate message, which
its claim turns into a no-op; releasing a claim that is alive would cost a second model run, and
the heartbeat is what prevents that.

``find_incomplete_products`` and ``requeue`` are plain functions; ``reconcile`` takes an advisory
lock and runs them in the caller's transaction, dispatching through the outbox like every other
hand-off (the Celery task in ``tasks.pipeline.tasks`` commits, then relays).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from datetime import timedelta
from enum import StrEnum

from sqlalchemy.orm import Session

from db.engine import set_system_scope
from db.enums import InboxStatus, Stage
from db.repositories import coverage, inbox, locks
from db.repositories import jobs as job_rows
from tasks import metrics
from tasks.pipeline import jobs
from tasks.pipeline.work import EnrichRequest

# The defaults of ENRICH_WORKERS__STALL_AFTER_S (derived from the heartbeat and retry settings)
# and ENRICH_WORKERS__QUEUED_STALL_AFTER_S; the beat task passes the configured values.
DEFAULT_STALLED_AFTER = timedelta(minutes=6)
DEFAULT_QUEUED_AFTER = timedelta(hours=24)
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


def find_incomplete_products(session: Session, *, stalled_after: timedelta = DEFAULT_STALLED_AFTER,
                             queued_after: timedelta = DEFAULT_QUEUED_AFTER, limit: int = 1000,
                             tenant_id: str | None = None) -> list[IncompleteProduct]:
    """Products to re-queue, oldest product id first."""
    rows = coverage.products_in(session, [r.value for r in Reason], stalled_after=stalled_after,
                                queued_after=queued_after, limit=limit, tenant_id=tenant_id)
    return [IncompleteProduct(r.tenant_id, r.product_id, r.external_id, r.product_version, Reason(r.reason),
                              r.job_id, r.job_stage) for r in rows]


def coverage_counts(session: Session, *, stalled_after: timedelta = DEFAULT_STALLED_AFTER,
                    queued_after: timedelta = DEFAULT_QUEUED_AFTER) -> dict[str, int]:
    """Products by reconciler class (``enrich status``): complete, in_flight, each Reason, failed_permanently."""
    counts = coverage.counts_by_class(session, stalled_after=stalled_after, queued_after=queued_after)
    keys = ["products", "complete", "in_flight", *[r.value for r in Reason], "failed_permanently"]
    out = {k: int(counts.get(k, 0)) for k in keys}
    out["products"] = sum(counts.values())
    return out


def requeue(session: Session, item: IncompleteProduct) -> Redispatch | None:
    """Prepare ``item`` for another run and dispatch it through the outbox (flush only). Stalled
    job: release its stage claim so a new task may take it. Otherwise: a new job for the same
    product version, caused by a synthetic ``reconcile`` inbox event, with the images of the last
    job. None when there is nothing to run from."""
    if item.reason is Reason.job_stalled and item.job_id is not None:
        stage = Stage(item.job_stage or jobs.FIRST.value)
        if not jobs.release_claim(session, item.job_id, stage.value):
            return None
        job = job_rows.lock(session, item.job_id)
        assert job is not None
        jobs.dispatch(session, job, stage)
        return Redispatch(item.job_id, stage.value)
    previous = next((j for j in job_rows.of_product_version(session, item.product_id, item.product_version)
                     if EnrichRequest.present(j.work)), None)
    if previous is None:
        return None
    event_id = uuid.uuid4()
    inbox.record(session, event_id, tenant_id=item.tenant_id, event_type="reconcile", status=InboxStatus.accepted,
                 detail=f"{item.reason.value} (product version {item.product_version})")
    request = replace(EnrichRequest.of(previous.work), reconciled=item.reason.value)  # images and stage hint
    job = jobs.create(session, tenant_id=item.tenant_id, event_id=event_id, product_id=item.product_id,
                      product_version=item.product_version, request=request)
    return Redispatch(job.id, jobs.FIRST.value)


def reconcile(session: Session, *, stalled_after: timedelta = DEFAULT_STALLED_AFTER,
              queued_after: timedelta = DEFAULT_QUEUED_AFTER, limit: int = 1000) -> list[Redispatch]:
    """One pass under a transaction-scoped advisory lock; what it re-dispatched (sent by the outbox
    relay once the caller commits). Cross-tenant by nature: the transaction runs in the system scope."""
    set_system_scope(session)
    if not locks.try_xact_lock(session, ADVISORY_LOCK_KEY):
        return []
    out, reasons = [], []
    for item in find_incomplete_products(session, stalled_after=stalled_after, queued_after=queued_after,
                                         limit=limit):
        if (dispatch := requeue(session, item)) is not None:
            out.append(dispatch)
            reasons.append(item.reason.value)
    session.flush()
    metrics.on_commit(session, lambda: metrics.reconciled(reasons))
    return out
