"""Intake of product events: inbox (idempotency), version guard, job creation.

All of it happens in one transaction; the caller dispatches the first stage after commit and
acks the message after that. A redelivered event finds its inbox row and is a no-op, except
that a job still waiting for its first stage is dispatched again (the crash may have happened
between commit and dispatch; stages are idempotent, so a second dispatch is harmless).
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

import structlog
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from db.enums import InboxStatus, JobStatus
from db.tables import EnrichmentJob, InboxEvent, Merchant, Product, Tenant
from tasks.errors import ErrorCode
from tasks.events import InvalidEvent, ProductEvent, failed_event
from tasks.pipeline.outbox import enqueue, enqueue_task

log = structlog.get_logger(__name__)


class Outcome(StrEnum):
    accepted = "accepted"  # new job: dispatch its first stage
    redispatch = "redispatch"  # seen before, job still pending: relay its hand-off if still unsent
    duplicate = "duplicate"  # seen before: nothing to do
    stale = "stale"  # older than the stored version: listing.failed stale_version
    rejected = "rejected"  # invalid: listing.failed invalid_event, dead-lettered


@dataclass(frozen=True)
class IntakeResult:
    outcome: Outcome
    event_id: uuid.UUID
    job_id: int | None = None


def _ensure_tenant_and_merchant(session: Session, tenant_id: str, merchant_id: str) -> None:
    session.execute(insert(Tenant).values(id=tenant_id).on_conflict_do_nothing())
    session.execute(insert(Merchant).values(tenant_id=tenant_id, id=merchant_id).on_conflict_do_nothing())


def _record_inbox(session: Session, event_id: uuid.UUID, tenant_id: str | None, event_type: str,
                  status: InboxStatus, detail: str | None = None) -> bool:
    """Insert the inbox row; False when this event id was already received."""
    inserted = session.execute(
        insert(InboxEvent).values(event_id=event_id, tenant_id=tenant_id, event_type=event_type,
                                  status=status.value, detail=detail)
        .on_conflict_do_nothing(index_elements=["event_id"]).returning(InboxEvent.event_id)
    ).scalar_one_or_none()
    return inserted is not None


def accept_product_event(session: Session, event: ProductEvent) -> IntakeResult:
    _ensure_tenant_and_merchant(session, event.tenant_id, event.merchant_id)
    if not _record_inbox(session, event.event_id, event.tenant_id, event.event_type, InboxStatus.accepted):
        job = session.scalar(select(EnrichmentJob).where(EnrichmentJob.event_id == event.event_id))
        if job is not None and job.status == JobStatus.pending.value:
            return IntakeResult(Outcome.redispatch, event.event_id, job.id)
        return IntakeResult(Outcome.duplicate, event.event_id, job.id if job else None)

    product = session.scalar(
        select(Product).where(Product.tenant_id == event.tenant_id, Product.external_id == event.external_id)
        .with_for_update()
    )
    if product is not None and product.version >= event.version:
        inbox = session.get(InboxEvent, event.event_id)
        assert inbox is not None
        inbox.status = InboxStatus.stale.value
        inbox.detail = f"stored version {product.version} >= event version {event.version}"
        enqueue(session, "listing.failed", failed_event(
            causation_id=event.event_id, code=ErrorCode.stale_version, retryable=False,
            detail=f"product {event.external_id} version {event.version} is not newer than the stored version "
                   f"{product.version}; ignored", tenant_id=event.tenant_id, merchant_id=event.merchant_id,
            external_id=event.external_id, version=event.version), tenant_id=event.tenant_id)
        log.info("intake.stale", stored=product.version, received=event.version)
        return IntakeResult(Outcome.stale, event.event_id)

    if product is None:
        product = Product(tenant_id=event.tenant_id, merchant_id=event.merchant_id, external_id=event.external_id,
                          version=event.version, category=event.category)
        session.add(product)
    product.merchant_id = event.merchant_id
    product.version = event.version
    product.category = event.category
    product.title = event.title
    product.description = event.description
    product.attributes = event.attributes
    product.locale = event.locale
    product.updated_at = datetime.now(UTC)
    session.flush()
    job = EnrichmentJob(tenant_id=event.tenant_id, event_id=event.event_id, product_id=product.id,
                        product_version=event.version, status=JobStatus.pending.value,
                        work={"image_urls": [[i.url, i.role] for i in event.images]})
    session.add(job)
    session.flush()
    enqueue_task(session, "catalog.fetch", job.id, queue="cpu", tenant_id=event.tenant_id)
    log.info("intake.accepted", job_id=job.id, version=event.version)
    return IntakeResult(Outcome.accepted, event.event_id, job.id)


def reject_invalid_event(session: Session, exc: InvalidEvent, body: bytes, routing_key: str) -> IntakeResult:
    """Record an invalid event and its listing.failed (invalid_event). Idempotent per event id;
    an event without a usable id gets one derived from its bytes, so a redelivery is still a no-op."""
    event_id = exc.event_id or uuid.uuid5(uuid.NAMESPACE_URL, "sha256:" + hashlib.sha256(body).hexdigest())
    raw = exc.raw
    tenant = raw.get("tenant_id") if isinstance(raw.get("tenant_id"), str) and len(raw["tenant_id"]) <= 128 else None
    if tenant is not None and "\x00" in tenant:
        tenant = None
    if not _record_inbox(session, event_id, tenant, routing_key[:64], InboxStatus.rejected, exc.detail):
        return IntakeResult(Outcome.duplicate, event_id)
    product = raw.get("product") if isinstance(raw.get("product"), dict) else {}
    ext = product.get("external_id") if isinstance(product.get("external_id"), str) else None
    raw_version = product.get("version")
    version = raw_version if isinstance(raw_version, int) and not isinstance(raw_version, bool) else None
    merchant = raw.get("merchant_id") if isinstance(raw.get("merchant_id"), str) else None
    clean = (lambda v: v if v is None or ("\x00" not in v and len(v) <= 256) else None)
    try:
        payload = failed_event(
            causation_id=event_id, code=ErrorCode.invalid_event, detail=exc.detail, retryable=False,
            tenant_id=tenant, merchant_id=clean(merchant), external_id=clean(ext), version=version if ext else None)
    except InvalidEvent:  # what was echoed from the hostile event does not fit our own contract: drop it
        payload = failed_event(causation_id=event_id, code=ErrorCode.invalid_event, detail=exc.detail,
                               retryable=False, tenant_id=tenant, merchant_id=None, external_id=None, version=None)
    enqueue(session, "listing.failed", payload, tenant_id=tenant)
    log.warning("intake.invalid", event_id=str(event_id), detail=exc.detail[:200])
    return IntakeResult(Outcome.rejected, event_id)
