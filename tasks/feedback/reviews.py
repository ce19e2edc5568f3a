"""Merchant reviews (``listing.reviewed``): validation, idempotent application, field-level errors.

A review is applied in the caller's transaction: an inbox row (every event id is received once),
one ``review_feedback`` row keyed by the event id, the listing's status, and one ``field_errors``
row per field the merchant changed (what the listing said, what the merchant said, and the model
versions that produced it). A review of a listing that does not exist, or that belongs to another
tenant or merchant, is refused with a code; the detail never carries the other tenant's data.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import structlog
from sqlalchemy.orm import Session

from db.enums import InboxStatus, ReviewDecision
from db.repositories import feedback as feedback_rows
from db.repositories import inbox
from db.tables import Listing
from tasks.events import InvalidEvent, decode_json, validate

log = structlog.get_logger(__name__)

EVENT_TYPE = "listing.reviewed"
TEXT_FIELDS = ("title", "description")


class ReviewCode(StrEnum):
    """Why a review was refused (stored in the inbox detail and the dead letter)."""

    invalid_event = "invalid_event"
    unknown_listing = "unknown_listing"
    tenant_mismatch = "tenant_mismatch"
    merchant_mismatch = "merchant_mismatch"


class ReviewOutcome(StrEnum):
    applied = "applied"
    duplicate = "duplicate"  # this event id was received before: nothing changed
    rejected = "rejected"


@dataclass(frozen=True)
class ReviewEvent:
    event_id: uuid.UUID
    occurred_at: datetime
    tenant_id: str
    merchant_id: str
    listing_id: int
    decision: ReviewDecision
    reviewer: str
    corrected: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None


@dataclass(frozen=True)
class ReviewResult:
    outcome: ReviewOutcome
    event_id: uuid.UUID
    feedback_id: int | None = None
    code: ReviewCode | None = None
    detail: str = ""
    field_errors: int = 0


def parse_review_event(body: bytes, content_type: str | None) -> ReviewEvent:
    """Raw bytes → a validated ReviewEvent; InvalidEvent (with the event id when readable) otherwise."""
    obj = decode_json(body, content_type)
    validate(obj, EVENT_TYPE)
    try:
        occurred_at = datetime.fromisoformat(obj["occurred_at"])
    except ValueError:
        raise InvalidEvent("$.occurred_at: not an ISO 8601 date-time", event_id=uuid.UUID(obj["event_id"]),
                           raw=obj) from None
    if occurred_at.tzinfo is None:
        occurred_at = occurred_at.replace(tzinfo=UTC)
    return ReviewEvent(
        event_id=uuid.UUID(obj["event_id"]), occurred_at=occurred_at,
        tenant_id=obj["tenant_id"], merchant_id=obj["merchant_id"], listing_id=obj["listing_id"],
        decision=ReviewDecision(obj["decision"]), reviewer=obj["reviewer"],
        corrected=dict(obj.get("corrected") or {}), reason=obj.get("reason"),
    )


def _refuse(session: Session, event: ReviewEvent, code: ReviewCode, detail: str) -> ReviewResult:
    if not inbox.record(session, event.event_id, tenant_id=event.tenant_id, event_type=EVENT_TYPE,
                        status=InboxStatus.rejected, detail=f"{code}: {detail}"):
        return ReviewResult(ReviewOutcome.duplicate, event.event_id)
    log.warning("review.rejected", event_id=str(event.event_id), code=code.value, listing_id=event.listing_id)
    return ReviewResult(ReviewOutcome.rejected, event.event_id, code=code, detail=detail)


def reject_invalid_review(session: Session, exc: InvalidEvent, fallback_id: uuid.UUID) -> ReviewResult:
    """Record an event that failed validation (idempotent per event id, or per body hash without one)."""
    event_id = exc.event_id or fallback_id
    tenant = exc.raw.get("tenant_id")
    tenant = tenant if isinstance(tenant, str) and len(tenant) <= 128 and "\x00" not in tenant else None
    detail = f"{ReviewCode.invalid_event}: {exc.detail}"
    if not inbox.record(session, event_id, tenant_id=tenant, event_type=EVENT_TYPE,
                        status=InboxStatus.rejected, detail=detail):
        return ReviewResult(ReviewOutcome.duplicate, event_id)
    log.warning("review.invalid", event_id=str(event_id), detail=exc.detail[:200])
    return ReviewResult(ReviewOutcome.rejected, event_id, code=ReviewCode.invalid_event, detail=exc.detail)


def _shown_value(listing: Listing, name: str) -> Any:
    """What the merchant was shown for ``name``: the verified listing content."""
    if name in TEXT_FIELDS:
        return listing.content.get(name)
    attribute = (listing.content.get("attributes") or {}).get(name)
    return attribute.get("value") if isinstance(attribute, dict) else attribute


def field_diffs(listing: Listing, corrected: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{field: (listing value, merchant value)} for every corrected field that actually differs."""
    diffs: dict[str, tuple[Any, Any]] = {}
    for name in TEXT_FIELDS:
        if name in corrected and corrected[name] != _shown_value(listing, name):
            diffs[name] = (_shown_value(listing, name), corrected[name])
    for name, value in (corrected.get("attributes") or {}).items():
        shown = _shown_value(listing, name)
        if value != shown:
            diffs[f"attributes.{name}"] = (shown, value)
    return diffs


def apply_review(session: Session, event: ReviewEvent) -> ReviewResult:
    """Apply one review (flush only). Idempotent on ``event_id``."""
    found = feedback_rows.lock_listing_with_merchant(session, event.listing_id)
    if found is None:
        return _refuse(session, event, ReviewCode.unknown_listing, f"listing {event.listing_id} does not exist")
    listing, merchant_id = found
    if listing.tenant_id != event.tenant_id:
        # Same answer shape as for an unknown listing: nothing about the owner leaks.
        return _refuse(session, event, ReviewCode.tenant_mismatch,
                       f"listing {event.listing_id} does not belong to tenant {event.tenant_id}")
    if merchant_id != event.merchant_id:
        return _refuse(session, event, ReviewCode.merchant_mismatch,
                       f"listing {event.listing_id} does not belong to merchant {event.merchant_id}")
    if not inbox.record(session, event.event_id, tenant_id=event.tenant_id, event_type=EVENT_TYPE,
                        status=InboxStatus.accepted):
        existing = feedback_rows.feedback_id_for_event(session, event.event_id)
        return ReviewResult(ReviewOutcome.duplicate, event.event_id, feedback_id=existing)

    feedback = feedback_rows.add_feedback(
        session, tenant_id=event.tenant_id, event_id=event.event_id, listing_id=listing.id,
        decision=event.decision.value, reviewer=event.reviewer, reason=event.reason, corrected=event.corrected)
    diffs = field_diffs(listing, event.corrected)
    feedback_rows.add_field_errors(session, feedback, listing, diffs)
    # Reviews can arrive out of order: the status follows the most recent review, not the last delivered.
    if listing.reviewed_at is None or event.occurred_at >= listing.reviewed_at:
        listing.status = event.decision.value
        listing.reviewed_at = event.occurred_at
    session.flush()
    log.info("review.applied", event_id=str(event.event_id), listing_id=listing.id,
             decision=event.decision.value, field_errors=len(diffs))
    return ReviewResult(ReviewOutcome.applied, event.event_id, feedback_id=feedback.id, field_errors=len(diffs))


def review_event_payload(*, tenant_id: str, merchant_id: str, listing_id: int, decision: str,
                         reviewer: str = "merchant-ui", corrected: dict[str, Any] | None = None,
                         reason: str | None = None, event_id: uuid.UUID | None = None) -> dict[str, Any]:
    """A valid ``listing.reviewed`` event (for tests, demos and publishers in Python)."""
    from tasks.events import SCHEMA_VERSION, now_iso

    payload: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "event_id": str(event_id or uuid.uuid4()), "event_type": EVENT_TYPE,
        "occurred_at": now_iso(), "tenant_id": tenant_id, "merchant_id": merchant_id, "listing_id": listing_id,
        "decision": decision, "reviewer": reviewer,
    }
    if corrected is not None:
        payload["corrected"] = corrected
    if reason is not None:
        payload["reason"] = reason
    validate(payload, EVENT_TYPE)
    return payload
