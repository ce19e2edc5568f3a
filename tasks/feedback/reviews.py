"""Merchant reviews (``listing.reviewed``): validation, idempotent application, field-level errors.

A review is applied in the caller's transaction: an inbox row (every event id is received once),
one ``review_feedback`` row keyed by the event id, the listing's status, the merchant's corrections
written into the listing's content, and one ``field_errors`` row per field the merchant changed
(what the model generated, what the merchant said, and the model versions that produced it).
Reviews arrive out of order: status and content follow the most recent review by ``occurred_at``;
an older review is recorded but changes neither. A review of a listing that does not exist, or
that belongs to another tenant or merchant, is refused with a code; the detail never carries the
other tenant's data.
"""

from __future__ import annotations

import copy
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
from models.categories import CategorySchema, load_schema
from models.errors import UnsupportedCategory
from tasks.events import InvalidEvent, decode_json, validate

log = structlog.get_logger(__name__)

EVENT_TYPE = "listing.reviewed"
TEXT_FIELDS = ("title", "description")
# The shape the pipeline gives a merchant-supplied attribute (models.verify.SOURCE_MERCHANT; not
# imported from there: that module pulls in the CLIP stack).
MERCHANT_SOURCE = "merchant"
MERCHANT_CONFIDENCE = 1.0


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
    content_edited: bool = False  # the listing's content now shows this review's corrections
    refused: dict[str, str] = field(default_factory=dict)  # corrections the listing's schema refuses: why


@dataclass(frozen=True)
class ContentEdit:
    content: dict[str, Any]  # the listing content with every correction the schema admits
    refused: dict[str, str]  # {"attributes.<name>": why}: kept in the feedback, never in the content


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


def _generated_value(listing: Listing, name: str) -> Any:
    """What the model produced for ``name``: the verified content as generated, not an earlier edit."""
    generated = listing.generated_content or listing.content
    if name in TEXT_FIELDS:
        return generated.get(name)
    attribute = (generated.get("attributes") or {}).get(name)
    return attribute.get("value") if isinstance(attribute, dict) else attribute


def field_diffs(listing: Listing, corrected: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{field: (model value, merchant value)} for every corrected field that differs from the model's."""
    diffs: dict[str, tuple[Any, Any]] = {}
    for name in TEXT_FIELDS:
        if name in corrected and corrected[name] != _generated_value(listing, name):
            diffs[name] = (_generated_value(listing, name), corrected[name])
    for name, value in (corrected.get("attributes") or {}).items():
        generated = _generated_value(listing, name)
        if value != generated:
            diffs[f"attributes.{name}"] = (generated, value)
    return diffs


def has_corrections(corrected: dict[str, Any]) -> bool:
    return any(corrected.get(name) is not None for name in TEXT_FIELDS) or bool(corrected.get("attributes"))


def listing_schema(schema_id: str) -> CategorySchema | None:
    name, _, version = schema_id.partition("@")
    try:
        return load_schema(name, int(version) if version.isdigit() else None)
    except UnsupportedCategory:
        return None


def _attribute_refusal(schema: CategorySchema | None, name: str, value: Any) -> str | None:
    """Why the listing's schema refuses ``name = value`` (None when it admits it). Visual attributes
    are the category's vocabulary (enums SQL users filter on); merchant-only ones are free values."""
    if schema is None or name in schema.merchant_only_attributes:
        return None
    allowed = schema.visual_attributes.get(name)
    if allowed is None:
        return f"{schema.schema_id} has no attribute {name!r}"
    if not isinstance(value, str) or value not in allowed:
        return f"{value!r} is not one of the {schema.schema_id} values of {name!r}"
    return None


def edited_content(schema: CategorySchema | None, content: dict[str, Any],
                   corrected: dict[str, Any]) -> ContentEdit:
    """``content`` with the merchant's corrections: title and description replaced as given (the
    event contract bounds them), each admitted attribute set as a merchant attribute
    (``{value, confidence: 1.0, source: "merchant"}``, as the pipeline stores merchant data);
    fields the merchant did not correct keep their value."""
    out = copy.deepcopy(content)
    for name in TEXT_FIELDS:
        if corrected.get(name) is not None:
            out[name] = corrected[name]
    attributes = dict(out.get("attributes") or {})
    refused: dict[str, str] = {}
    for name, value in (corrected.get("attributes") or {}).items():
        if (reason := _attribute_refusal(schema, name, value)) is not None:
            refused[f"attributes.{name}"] = reason
            continue
        attributes[name] = {"value": value, "confidence": MERCHANT_CONFIDENCE, "source": MERCHANT_SOURCE}
    out["attributes"] = attributes
    return ContentEdit(content=out, refused=refused)


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
    edit = edited_content(listing_schema(listing.schema_id), listing.content, event.corrected)
    refused = "; ".join(f"{name}: {why}" for name, why in edit.refused.items())
    if not inbox.record(session, event.event_id, tenant_id=event.tenant_id, event_type=EVENT_TYPE,
                        status=InboxStatus.accepted, detail=f"corrections refused: {refused}" if refused else None):
        existing = feedback_rows.feedback_id_for_event(session, event.event_id)
        return ReviewResult(ReviewOutcome.duplicate, event.event_id, feedback_id=existing)

    feedback = feedback_rows.add_feedback(
        session, tenant_id=event.tenant_id, event_id=event.event_id, listing_id=listing.id,
        decision=event.decision.value, reviewer=event.reviewer, reason=event.reason, corrected=event.corrected)
    diffs = field_diffs(listing, event.corrected)
    feedback_rows.add_field_errors(session, feedback, listing, diffs)
    # Reviews can arrive out of order: status and content follow the most recent review, not the last
    # delivered. A rejection keeps the content as it stands (it never brings the generated text back).
    newest = listing.reviewed_at is None or event.occurred_at >= listing.reviewed_at
    content_edited = (newest and event.decision is not ReviewDecision.rejected
                      and has_corrections(event.corrected) and edit.content != listing.content)
    if newest:
        listing.status = event.decision.value
        listing.reviewed_at = event.occurred_at
    if content_edited:
        feedback_rows.replace_content(session, listing, edit.content)
    session.flush()
    if edit.refused:
        log.warning("review.corrections_refused", event_id=str(event.event_id), listing_id=listing.id,
                    fields=sorted(edit.refused))
    log.info("review.applied", event_id=str(event.event_id), listing_id=listing.id,
             decision=event.decision.value, field_errors=len(diffs), content_edited=content_edited)
    return ReviewResult(ReviewOutcome.applied, event.event_id, feedback_id=feedback.id, field_errors=len(diffs),
                        content_edited=content_edited, refused=edit.refused)


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
