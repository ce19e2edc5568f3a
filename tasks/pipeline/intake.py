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
from sqlalchemy.orm import Session

from db.enums import InboxStatus, JobStatus
from db.repositories import inbox, products
from db.repositories import jobs as job_rows
from db.tables import Product
from tasks.errors import ErrorCode
from tasks.events import InvalidEvent, ProductEvent, failed_event
from tasks.pipeline import jobs
from tasks.pipeline.outbox import enqueue
from tasks.pipeline.work import EnrichRequest, ImageRef

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


def accept_product_event(session: Session, event: ProductEvent) -> IntakeResult:
    products.ensure_tenant_and_merchant(session, event.tenant_id, event.merchant_id)
    if not inbox.record(session, event.event_id, tenant_id=event.tenant_id, event_type=event.event_type,
                        status=InboxStatus.accepted):
        job = job_rows.by_event(session, event.event_id)
        if job is not None and job.status == JobStatus.pending.value:
            return IntakeResult(Outcome.redispatch, event.event_id, job.id)
        return IntakeResult(Outcome.duplicate, event.event_id, job.id if job else None)

    product = products.lock_by_external_id(session, event.tenant_id, event.external_id)
    if product is not None and product.version >= event.version:
        inbox.mark(session, event.event_id, InboxStatus.stale,
                   f"stored version {product.version} >= event version {event.version}")
        enqueue(session, "listing.failed", failed_event(
            causation_id=event.event_id, code=ErrorCode.stale_version, retryable=False,
            detail=f"product {event.external_id} version {event.version} is not newer than the stored version "
                   f"{product.version}; ignored", tenant_id=event.tenant_id, merchant_id=event.merchant_id,
            external_id=event.external_id, version=event.version), tenant_id=event.tenant_id)
        log.info("intake.stale", stored=product.version, received=event.version)
        return IntakeResult(Outcome.stale, event.event_id)

    if product is None:
        product = products.add(session, Product(tenant_id=event.tenant_id, merchant_id=event.merchant_id,
                                                external_id=event.external_id, version=event.version,
                                                category=event.category))
    product.merchant_id = event.merchant_id
    product.version = event.version
    product.category = event.category
    product.title = event.title
    product.description = event.description
    product.attributes = event.attributes
    product.locale = event.locale
    product.updated_at = datetime.now(UTC)
    session.flush()
    request = EnrichRequest(tuple(ImageRef(i.url, i.role) for i in event.images), stages_hint=event.stages_hint)
    job = jobs.create(session, tenant_id=event.tenant_id, event_id=event.event_id, product_id=product.id,
                      product_version=event.version, request=request)
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
    if not inbox.record(session, event_id, tenant_id=tenant, event_type=routing_key[:64],
                        status=InboxStatus.rejected, detail=exc.detail):
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
