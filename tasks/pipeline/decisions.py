"""Merchant decisions on duplicates (``duplicate.reviewed``): remembered per tenant, honoured by every
later dedup pass.

A decision names two images by SHA-256 (content, so it holds for images stored later too) and
says ``not_duplicate`` or ``confirmed``. It is applied in the caller's transaction, under the
tenant's duplicate-groups lock (``images.lock_groups``), which fetch takes too:

* ``not_duplicate``: if the two share a group, the one that joined later leaves it (never the
  representative); the rest of the group stays. From then on fetch never puts the pair in one
  group: a candidate is skipped when it, or any member of its group, is decided apart from the
  query image.
* ``confirmed``: the two are grouped (member method ``confirmed``), whatever verification said:
  into the older of their groups, the other group's members coming along, except members decided
  apart from someone in the target group (they are left out). ``not_duplicate`` wins a conflict:
  a confirmed image that is decided apart from a member of the other group stays where it is.
* An image that is not stored yet: the decision waits; fetch applies it when the image arrives.

Replays are no-ops (inbox). Decisions arrive out of order: the one with the latest ``occurred_at``
is current (ties: the larger event id); an older one arriving later is recorded in the inbox as
``stale`` and changes nothing.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy.orm import Session

from db.enums import InboxStatus, PairDecision
from db.repositories import duplicate_decisions as decision_rows
from db.repositories import images, inbox, products
from tasks.events import InvalidEvent, decode_json, validate

if TYPE_CHECKING:  # the events worker handles decisions without loading OpenCV
    from models.dedup import DuplicateMatch

log = structlog.get_logger(__name__)

EVENT_TYPE = "duplicate.reviewed"
DUPLICATE_REVIEW_KEY = EVENT_TYPE  # its routing key, bound to the review-events queue
CONFIRMED_METHOD = "confirmed"  # duplicate_members.method of a pair grouped because a merchant said so


class DecisionOutcome(StrEnum):
    applied = "applied"  # current now, and the groups follow it
    stale = "stale"  # a decision with a later occurred_at is current for the pair: nothing changed
    duplicate = "duplicate"  # this event id was received before
    rejected = "rejected"  # not valid against the contract


class GroupChange(StrEnum):
    split = "split"  # the pair shared a group; one of them left it
    grouped = "grouped"  # the pair shares a group now
    unchanged = "unchanged"  # already as decided
    pending = "pending"  # an image of the pair is not stored yet
    blocked = "blocked"  # grouping would put a not_duplicate pair in one group


@dataclass(frozen=True)
class DuplicateReviewEvent:
    event_id: uuid.UUID
    occurred_at: datetime
    tenant_id: str
    merchant_id: str
    image_a_sha256: str
    image_b_sha256: str
    decision: PairDecision
    reviewer: str
    reason: str | None = None


@dataclass(frozen=True)
class DecisionResult:
    outcome: DecisionOutcome
    event_id: uuid.UUID
    change: GroupChange | None = None
    detail: str = ""


def parse_duplicate_review(body: bytes, content_type: str | None) -> DuplicateReviewEvent:
    """Raw bytes → a validated event; InvalidEvent (with the event id when readable) otherwise."""
    obj = decode_json(body, content_type)
    validate(obj, EVENT_TYPE)
    event_id = uuid.UUID(obj["event_id"])
    try:
        occurred_at = datetime.fromisoformat(obj["occurred_at"])
    except ValueError:
        raise InvalidEvent("$.occurred_at: not an ISO 8601 date-time", event_id=event_id, raw=obj) from None
    a, b = decision_rows.pair_key(*obj["images"])  # distinct: the contract has uniqueItems
    return DuplicateReviewEvent(
        event_id=event_id, occurred_at=occurred_at if occurred_at.tzinfo else occurred_at.replace(tzinfo=UTC),
        tenant_id=obj["tenant_id"], merchant_id=obj["merchant_id"], image_a_sha256=a, image_b_sha256=b,
        decision=PairDecision(obj["decision"]), reviewer=obj["reviewer"], reason=obj.get("reason"))


def reject_invalid_duplicate_review(session: Session, exc: InvalidEvent,
                                    fallback_id: uuid.UUID) -> DecisionResult:
    """Record an event that failed validation (idempotent per event id, or per body hash without one)."""
    event_id = exc.event_id or fallback_id
    tenant = exc.raw.get("tenant_id")
    tenant = tenant if isinstance(tenant, str) and len(tenant) <= 128 and "\x00" not in tenant else None
    if not inbox.record(session, event_id, tenant_id=tenant, event_type=EVENT_TYPE,
                        status=InboxStatus.rejected, detail=f"invalid_event: {exc.detail}"):
        return DecisionResult(DecisionOutcome.duplicate, event_id)
    log.warning("duplicate_review.invalid", event_id=str(event_id), detail=exc.detail[:200])
    return DecisionResult(DecisionOutcome.rejected, event_id, detail=exc.detail)


def apply_duplicate_review(session: Session, event: DuplicateReviewEvent) -> DecisionResult:
    """Remember the decision and bring the groups in line with it (flush only). Idempotent."""
    products.ensure_tenant_and_merchant(session, event.tenant_id, event.merchant_id)
    if not inbox.record(session, event.event_id, tenant_id=event.tenant_id, event_type=EVENT_TYPE,
                        status=InboxStatus.accepted):
        return DecisionResult(DecisionOutcome.duplicate, event.event_id)
    images.lock_groups(session, event.tenant_id)
    if not decision_rows.record(session, decision_rows.NewDecision(
            tenant_id=event.tenant_id, image_a_sha256=event.image_a_sha256,
            image_b_sha256=event.image_b_sha256, decision=event.decision, event_id=event.event_id, occurred_at=event.occurred_at,
            merchant_id=event.merchant_id, reviewer=event.reviewer, reason=event.reason)):
        detail = "a decision with a later occurred_at is current for this pair"
        inbox.mark(session, event.event_id, InboxStatus.stale, detail)
        log.info("duplicate_review.stale", event_id=str(event.event_id))
        return DecisionResult(DecisionOutcome.stale, event.event_id, detail=detail)
    change = apply_pair(session, event.tenant_id, event.image_a_sha256, event.image_b_sha256, event.decision)
    session.flush()
    log.info("duplicate_review.applied", event_id=str(event.event_id), decision=event.decision.value,
             change=change.value)
    return DecisionResult(DecisionOutcome.applied, event.event_id, change=change)


def apply_pair(session: Session, tenant_id: str, sha_a: str, sha_b: str,
               decision: PairDecision) -> GroupChange:
    """Make the tenant's groups agree with one decision (the caller holds ``images.lock_groups``)."""
    ids = images.ids_by_sha256(session, tenant_id, [sha_a, sha_b])
    if len(ids) < 2:
        return GroupChange.pending
    if decision is PairDecision.not_duplicate:
        return _split(session, tenant_id, ids[sha_a], ids[sha_b])
    return _join(session, tenant_id, (ids[sha_a], sha_a), (ids[sha_b], sha_b))


def _split(session: Session, tenant_id: str, image_a: int, image_b: int) -> GroupChange:
    group = images.group_id_of(session, tenant_id, image_a)
    if group is None or group != images.group_id_of(session, tenant_id, image_b):
        return GroupChange.unchanged
    order = [m.image_id for m in images.group_members(session, tenant_id, group)]  # representative first
    images.remove_member(session, tenant_id, max(image_a, image_b, key=order.index))
    return GroupChange.split


def _join(session: Session, tenant_id: str, a: tuple[int, str], b: tuple[int, str]) -> GroupChange:
    groups = {image_id: images.group_id_of(session, tenant_id, image_id) for image_id, _ in (a, b)}
    if groups[a[0]] is not None and groups[a[0]] == groups[b[0]]:
        return GroupChange.unchanged
    if groups[a[0]] is None and groups[b[0]] is None:
        first, second = sorted((a[0], b[0]))  # the image stored first represents the new group
        group = images.new_group(session, tenant_id, first, CONFIRMED_METHOD)
        images.add_member(session, tenant_id, group, second, method=CONFIRMED_METHOD)
        return GroupChange.grouped
    # Into the older group; the other image (and its own group, if any) moves.
    (target_image, _), (mover, mover_sha) = sorted(
        (a, b), key=lambda x: (groups[x[0]] is None, groups[x[0]] or 0))
    target = groups[target_image]
    assert target is not None
    inside = [m.sha256 for m in images.group_members(session, tenant_id, target)]
    source = groups[mover]
    coming = (images.group_members(session, tenant_id, source) if source is not None
              else [images.GroupMember(mover, mover_sha, CONFIRMED_METHOD, False)])
    apart = decision_rows.not_duplicate_among(session, tenant_id, inside + [m.sha256 for m in coming])

    def conflicts(sha: str) -> bool:
        return any(decision_rows.pair_key(sha, other) in apart for other in inside)

    if conflicts(mover_sha):
        return GroupChange.blocked
    left_out = [m.image_id for m in coming if m.image_id != mover and conflicts(m.sha256)]
    if source is None:
        images.add_member(session, tenant_id, target, mover, method=CONFIRMED_METHOD)
    else:
        images.evict(session, tenant_id, left_out)
        staying = [m.image_id for m in coming if m.image_id not in left_out]
        images.move_members(session, tenant_id, staying, target)
        images.delete_group(session, tenant_id, source)
    images.set_method(session, tenant_id, mover, CONFIRMED_METHOD)
    return GroupChange.grouped


# ---------------------------------------------------------------- what fetch asks


def decided_apart(session: Session, tenant_id: str, sha256: str) -> set[str]:
    """Digests of the images decided ``not_duplicate`` with this one."""
    return {other for other, d in decision_rows.partners(session, tenant_id, sha256).items()
            if d is PairDecision.not_duplicate}


def allowed_match(session: Session, tenant_id: str, sha256: str,
                  matches: list[DuplicateMatch]) -> DuplicateMatch | None:
    """The first verified match (best first) the query may be grouped with: neither the matched
    image nor any member of its group is decided apart from the query."""
    if not matches:
        return None  # most new photos: no decision to read
    apart = decided_apart(session, tenant_id, sha256)
    for match in matches:
        group = images.group_id_of(session, tenant_id, match.image_id)
        digests = ([m.sha256 for m in images.group_members(session, tenant_id, group)] if group is not None
                   else [images.sha256_of(session, tenant_id, match.image_id)])
        if apart.isdisjoint(digests):
            return match
    return None


def honour_confirmed(session: Session, tenant_id: str, image_id: int, sha256: str) -> list[str]:
    """Group a newly stored image with every stored image a merchant confirmed it duplicates;
    returns their digests (the caller holds ``images.lock_groups``)."""
    joined: list[str] = []
    for other, decision in sorted(decision_rows.partners(session, tenant_id, sha256).items()):
        if decision is PairDecision.confirmed and apply_pair(
                session, tenant_id, sha256, other, decision) is GroupChange.grouped:
            joined.append(other)
    return joined


def duplicate_review_payload(*, tenant_id: str, merchant_id: str, images: tuple[str, str] | list[str],
                             decision: str, reviewer: str = "merchant-ui", occurred_at: str | None = None,
                             reason: str | None = None, event_id: uuid.UUID | None = None) -> dict[str, Any]:
    """A valid ``duplicate.reviewed`` event (for tests, demos and publishers in Python)."""
    from tasks.events import SCHEMA_VERSION, now_iso

    payload: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "event_id": str(event_id or uuid.uuid4()), "event_type": EVENT_TYPE,
        "occurred_at": occurred_at or now_iso(), "tenant_id": tenant_id, "merchant_id": merchant_id,
        "images": list(images), "decision": decision, "reviewer": reviewer,
    }
    if reason is not None:
        payload["reason"] = reason
    validate(payload, EVENT_TYPE)
    return payload
