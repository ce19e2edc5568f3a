"""The pipeline's shape (one stage table) and enrichment job state: claim, hand off, finish, fail.

``STAGES`` is the only place the pipeline's order, queues, task names and default next stage
are written; the Celery tasks, the hand-offs, the reconciler's redispatch and the claims all read
it. A stage is claimed under a row lock by the task id that runs it. A redelivery of the same task
(same id) re-claims; a concurrent duplicate (another id) backs off; a stage already passed, a
stage not reached yet, or a job already done/failed/superseded, is a no-op. That turns
at-least-once delivery into one model run. While a task runs it keeps its claim fresh
(``heartbeat``), so the reconciler can tell a live claim from one whose worker died.

A job runs for one product version, but intake updates the product row in place, so a job whose
version is no longer the product's stops at its next claim as ``superseded``: final, no retry, no
event (neither ``listing.enriched`` nor ``listing.failed``); the newer version's own job carries
on. The claim holds the product row ``FOR SHARE`` for the stage's first transaction (for persist:
the one that writes the listing), so what a claimed stage reads is its own version's text.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import structlog
from sqlalchemy.orm import Session

from db.enums import JobStatus, Stage
from db.repositories import jobs as job_rows
from db.repositories import products
from db.tables import EnrichmentJob
from tasks import metrics, tracing
from tasks.errors import ErrorCode, PipelineError
from tasks.events import failed_event
from tasks.pipeline.outbox import enqueue, enqueue_task
from tasks.pipeline.work import Claims, EnrichRequest, FetchedImages, JobTrace, ModelOutput

log = structlog.get_logger(__name__)

TASK_PREFIX = "catalog."


@dataclass(frozen=True)
class StageSpec:
    stage: Stage
    task_name: str  # the stable Celery task name
    queue: Literal["cpu", "gpu"]  # logical queue; workers.topology maps it to a broker queue
    next: Stage | None  # where the stage hands the job on by default (fetch skips model on reuse)


STAGES: dict[Stage, StageSpec] = {
    Stage.fetch: StageSpec(Stage.fetch, TASK_PREFIX + "fetch", "cpu", next=Stage.model),
    Stage.model: StageSpec(Stage.model, TASK_PREFIX + "model", "gpu", next=Stage.persist),
    Stage.persist: StageSpec(Stage.persist, TASK_PREFIX + "persist", "cpu", next=None),
}
STAGE_ORDER = list(STAGES)
FIRST = STAGE_ORDER[0]
FINAL = {JobStatus.done.value, JobStatus.failed.value, JobStatus.superseded.value}

Handoff = FetchedImages | ModelOutput


def dispatch(session: Session, job: EnrichmentJob, stage: Stage) -> None:
    """Write ``stage``'s task for this job to the outbox: sent by the relay once this commits."""
    spec = STAGES[stage]
    # The running stage's context (its span), else the one the job was created with (a reconciler re-run).
    trace = tracing.current() or _job_trace(job)
    enqueue_task(session, spec.task_name, job.id, queue=spec.queue, tenant_id=job.tenant_id, trace=trace)


def _job_trace(job: EnrichmentJob) -> tracing.TraceContext | None:
    stored = JobTrace.of(job.work or {})
    return tracing.TraceContext(stored.traceparent, stored.tracestate) if stored else None


def create(session: Session, *, tenant_id: str, event_id: object, product_id: int, product_version: int,
           request: EnrichRequest) -> EnrichmentJob:
    """A pending job for one product version, its first stage dispatched through the outbox."""
    work = request.to_work()
    if (trace := tracing.current()) is not None:  # the product event's traceparent (intake binds it)
        work.update(JobTrace(trace.traceparent, trace.tracestate).to_work())
    job = job_rows.add(session, EnrichmentJob(tenant_id=tenant_id, event_id=event_id, product_id=product_id,
                                              product_version=product_version, status=JobStatus.pending.value,
                                              work=work))
    dispatch(session, job, FIRST)
    return job


def claim(session: Session, job_id: int, stage: Stage, task_id: str,
          max_attempts: int | None = None) -> EnrichmentJob | None:
    """Claim ``stage`` of the job for ``task_id``; None when there is nothing for this task to do.

    ``max_attempts`` bounds how often one stage may start, whatever the broker: retries and
    redeliveries after a worker died both pass here, so a message that kills its worker every time
    ends as ``worker_lost`` even where the broker has no delivery limit (Redis).
    """
    job = job_rows.lock(session, job_id)
    if job is None or job.status in FINAL:
        return None
    if _supersede_if_stale(session, job, stage):
        return None
    current = Stage(job.stage) if job.stage else FIRST
    if STAGE_ORDER.index(stage) < STAGE_ORDER.index(current):
        return None  # already past this stage: a late duplicate
    if STAGE_ORDER.index(stage) > STAGE_ORDER.index(current):
        log.info("stage.not_reached", job_id=job_id, stage=stage.value, current=current.value)
        return None  # an early duplicate: the job's own task for this stage comes after the current one
    claims = Claims.of(job.work)
    holder = claims.holder(stage.value)
    if holder not in (None, task_id):
        log.info("stage.claimed_elsewhere", job_id=job_id, stage=stage.value, holder=holder)
        return None
    if max_attempts is not None and job.attempts.get(stage.value, 0) >= max_attempts:
        raise PipelineError(ErrorCode.worker_lost, f"stage {stage.value} started {max_attempts} times without "
                            "finishing (its worker died or it kept failing); given up", retryable=False)
    attempts = dict(job.attempts)
    if not attempts.get(stage.value):  # the first claim: updated_at is still the hand-off's (or creation's)
        metrics.queue_wait(session, stage.value, job.updated_at or job.created_at)
    attempts[stage.value] = attempts.get(stage.value, 0) + 1
    job.work = {**job.work, **claims.with_holder(stage.value, task_id).to_work()}
    job.attempts = attempts
    job.stage = stage.value
    job.status = JobStatus.running.value
    job.updated_at = datetime.now(UTC)
    session.flush()
    tracing.annotate(**{"catalog.tenant_id": job.tenant_id, "catalog.product_version": job.product_version})
    return job


def _supersede_if_stale(session: Session, job: EnrichmentJob, stage: Stage) -> bool:
    """End a live job whose product has moved to a newer version since it was created."""
    product = products.lock_shared(session, job.product_id)
    if product is None or product.version <= job.product_version:
        return False
    job.status = JobStatus.superseded.value
    job.updated_at = job.finished_at = datetime.now(UTC)
    session.flush()
    metrics.job_finished(session, JobStatus.superseded.value)
    log.info("job.superseded", job_id=job.id, stage=stage.value, version=job.product_version,
             current_version=product.version)
    return True


def heartbeat(session: Session, job_id: int, stage: Stage, task_id: str) -> bool:
    """Keep ``task_id``'s claim of ``stage`` fresh while it runs (``tasks.adapter`` beats every
    ``Runtime.heartbeat_s``); the reconciler calls a claimed stage stalled only once its beats stop.
    False when this task no longer holds the job's current stage: nothing is refreshed."""
    return job_rows.heartbeat(session, job_id, stage.value, task_id)


def release_claim(session: Session, job_id: int, stage: str) -> bool:
    """Forget who holds ``stage`` of a live job, so a new task may claim it (a stalled job)."""
    job = job_rows.lock(session, job_id)
    if job is None or job.status not in (JobStatus.pending.value, JobStatus.running.value):
        return False
    by_stage = dict(Claims.of(job.work).by_stage)
    by_stage.pop(stage, None)
    job.work = {**job.work, **Claims(by_stage).to_work()}
    job.updated_at = datetime.now(UTC)
    session.flush()
    return True


def hand_off(session: Session, job: EnrichmentJob, to: Stage, handoff: Handoff, *,
             timings: dict[str, float] | None = None) -> None:
    """Record what this stage produced, move the job to ``to`` and dispatch that stage's task."""
    job.stage = to.value
    job.work = {**job.work, **handoff.to_work()}
    if timings:
        job.timings_ms = {**job.timings_ms, **{k: round(v, 1) for k, v in timings.items()}}
    job.updated_at = datetime.now(UTC)
    session.flush()
    metrics.stage_timings(session, timings)
    dispatch(session, job, to)


def finish(session: Session, job: EnrichmentJob, *, listing_id: int, timings: dict[str, float] | None = None) -> None:
    job.status = JobStatus.done.value
    job.listing_id = listing_id
    if timings:
        job.timings_ms = {**job.timings_ms, **{k: round(v, 1) for k, v in timings.items()}}
    now = datetime.now(UTC)
    job.updated_at = job.finished_at = now
    session.flush()
    metrics.stage_timings(session, timings)
    metrics.job_finished(session, JobStatus.done.value)


def fail(session: Session, job_id: int, code: ErrorCode, detail: str, *, retryable: bool) -> bool:
    """Fail the job and write its listing.failed event, once. Returns False if it had already ended."""
    job = job_rows.lock(session, job_id)
    if job is None or job.status in FINAL:
        return False
    product = products.get(session, job.product_id)
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
    metrics.job_finished(session, JobStatus.failed.value, code.value)
    log.warning("job.failed", job_id=job_id, code=code.value, retryable=retryable, detail=detail[:200])
    return True
