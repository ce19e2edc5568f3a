"""Enrichment job rows: created by intake and the reconciler, locked by every stage."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

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
