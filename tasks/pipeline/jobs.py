"""Enrichment job state: claiming a stage, finishing, failing (with its listing.failed event).

A stage is claimed under a row lock by the task id that runs it. A redelivery of the same task
(same id) re-claims; a concurrent duplicate (another id) backs off; a stage already passed, a
stage not reached yet, or a job already done/failed, is a no-op. That turns at-least-once delivery into one model run.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy.orm import Session

from db.enums import JobStatus, Stage
from db.tables import EnrichmentJob, Product
from tasks.errors import ErrorCode, PipelineError
from tasks.events import failed_event
from tasks.pipeline.outbox import enqueue

log = structlog.get_logger(__name__)

STAGE_ORDER = [Stage.fetch, Stage.model, Stage.persist]
FINAL = {JobStatus.done.value, JobStatus.failed.value}


def claim(session: Session, job_id: int, stage: Stage, task_id: str,
          max_attempts: int | None = None) -> EnrichmentJob | None:
    """Claim ``stage`` of the job for ``task_id``; None when there is nothing for this task to do.

    ``max_attempts`` bounds how often one stage may start, whatever the broker: retries and
    redeliveries after a worker died both pass here, so a message that kills its worker every time
    ends as ``worker_lost`` even where the broker has no delivery limit (Redis).
    """
    job = session.get(EnrichmentJob, job_id, with_for_update=True)
    if job is None or job.status in FINAL:
        return None
    current = Stage(job.stage) if job.stage else Stage.fetch
    if STAGE_ORDER.index(stage) < STAGE_ORDER.index(current):
        return None  # already past this stage: a late duplicate
    if STAGE_ORDER.index(stage) > STAGE_ORDER.index(current):
        log.info("stage.not_reached", job_id=job_id, stage=stage.value, current=current.value)
        return None  # an early duplicate: the job's own task for this stage comes after the current one
    claims = dict(job.work.get("claims", {}))
    holder = claims.get(stage.value)
    if holder not in (None, task_id):
        log.info("stage.claimed_elsewhere", job_id=job_id, stage=stage.value, holder=holder)
        return None
    if max_attempts is not None and job.attempts.get(stage.value, 0) >= max_attempts:
        raise PipelineError(ErrorCode.worker_lost, f"stage {stage.value} started {max_attempts} times without "
                            "finishing (its worker died or it kept failing); given up", retryable=False)
    claims[stage.value] = task_id
    attempts = dict(job.attempts)
    attempts[stage.value] = attempts.get(stage.value, 0) + 1
    job.work = {**job.work, "claims": claims}
    job.attempts = attempts
    job.stage = stage.value
    job.status = JobStatus.running.value
    job.updated_at = datetime.now(UTC)
    session.flush()
    return job


def advance(session: Session, job: EnrichmentJob, to: Stage, *, work: dict[str, Any] | None = None,
            timings: dict[str, float] | None = None) -> None:
    job.stage = to.value
    if work:
        job.work = {**job.work, **work}
    if timings:
        job.timings_ms = {**job.timings_ms, **{k: round(v, 1) for k, v in timings.items()}}
    job.updated_at = datetime.now(UTC)
    session.flush()


def finish(session: Session, job: EnrichmentJob, *, listing_id: int, timings: dict[str, float] | None = None) -> None:
    job.status = JobStatus.done.value
    job.listing_id = listing_id
    if timings:
        job.timings_ms = {**job.timings_ms, **{k: round(v, 1) for k, v in timings.items()}}
    now = datetime.now(UTC)
    job.updated_at = job.finished_at = now
    session.flush()


def fail(session: Session, job_id: int, code: ErrorCode, detail: str, *, retryable: bool) -> bool:
    """Fail the job and write its listing.failed event, once. Returns False if it had already ended."""
    job = session.get(EnrichmentJob, job_id, with_for_update=True)
    if job is None or job.status in FINAL:
        return False
    product = session.get(Product, job.product_id)
    job.status = JobStatus.failed.value
    job.error_code = code.value
    job.error_detail = detail[:2000]
    job.retryable = retryable
    job.updated_at = job.finished_at = datetime.now(UTC)
    enqueue(session, "listing.failed", failed_event(
        causation_id=job.event_id, code=code, detail=detail, retryable=retryable, tenant_id=job.tenant_id,
        merchant_id=product.merchant_id if product else None,
        external_id=product.external_id if product else None, version=job.product_version,
    ), tenant_id=job.tenant_id)
    log.warning("job.failed", job_id=job_id, code=code.value, retryable=retryable, detail=detail[:200])
    return True
