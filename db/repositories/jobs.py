"""Enrichment job rows: created by intake and the reconciler, locked by every stage."""

from __future__ import annotations

import uuid

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db.enums import JobStatus
from db.tables import EnrichmentJob


def add(session: Session, job: EnrichmentJob) -> EnrichmentJob:
    session.add(job)
    session.flush()
    return job


def lock(session: Session, job_id: int) -> EnrichmentJob | None:
    """The job row under ``FOR UPDATE``: one stage transaction at a time per job."""
    return session.get(EnrichmentJob, job_id, with_for_update=True)


def by_event(session: Session, event_id: uuid.UUID) -> EnrichmentJob | None:
    return session.scalar(select(EnrichmentJob).where(EnrichmentJob.event_id == event_id))


def of_product_version(session: Session, product_id: int, product_version: int) -> list[EnrichmentJob]:
    """Every job of one product version, newest first."""
    return list(session.scalars(select(EnrichmentJob).where(
        EnrichmentJob.product_id == product_id, EnrichmentJob.product_version == product_version)
        .order_by(EnrichmentJob.id.desc())))


def heartbeat(session: Session, job_id: int, stage: str, task_id: str) -> bool:
    """Refresh ``updated_at`` of a live job whose current stage ``task_id`` holds; False when it
    does not (the job moved on or ended, or another task holds the stage now), so a stale worker
    never keeps someone else's claim alive.

    The claim is read where ``tasks.pipeline.work.Claims`` keeps it (``work -> 'claims' ->> stage``).
    Never waits for the row lock (``SKIP LOCKED``): a job row locked by a stage transaction is
    about to be written by that transaction anyway."""
    unlocked = (select(EnrichmentJob.id).where(EnrichmentJob.id == job_id)
                .with_for_update(skip_locked=True).scalar_subquery())
    result = session.execute(
        update(EnrichmentJob)
        .where(EnrichmentJob.id == unlocked,
               EnrichmentJob.status.in_((JobStatus.pending.value, JobStatus.running.value)),
               EnrichmentJob.stage == stage, EnrichmentJob.work["claims"][stage].astext == task_id)
        .values(updated_at=func.clock_timestamp())
        .execution_options(synchronize_session=False))
    return result.rowcount == 1
