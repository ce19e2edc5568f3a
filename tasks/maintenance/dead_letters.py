"""Dead letters, resolved by an operator: list them, replay a domain event, or discard one.

A dead letter stays (and counts in ``enrich status``) until it is resolved; resolved ones are
pruned after ``ENRICH_RETENTION__DEAD_LETTERS_KEEP_S``. Replaying re-publishes the event's JSON
on the events exchange under its routing key, where the normal intake takes it (the inbox makes
a second replay of the same event a no-op). Only domain events can be replayed; a stage task
message is not (its job was already ended as ``worker_lost``), and neither is an event the inbox
already recorded (the intake would only answer ``duplicate``): those are discarded instead.

Nothing is published inside a transaction: the row is read, the event published, then the row is
marked ``replayed`` in a second transaction (a crash in between leaves it unresolved, and a second
replay is harmless).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import structlog
from sqlalchemy.orm import Session, sessionmaker

from db.engine import admin_session
from db.repositories import dead_letters as rows
from db.repositories import inbox
from db.tables import DeadLetter
from tasks.runtime import EventPublisher

log = structlog.get_logger(__name__)

REPLAYABLE_ROUTING_KEYS = frozenset({"product.created", "product.updated", "listing.reviewed"})


class Resolution(StrEnum):
    replayed = "replayed"
    discarded = "discarded"


@dataclass(frozen=True)
class DeadLetterView:
    id: int
    created_at: datetime
    tenant_id: str | None
    queue: str
    routing_key: str | None
    reason: str
    detail: str | None
    size: int
    event_id: str | None  # the domain event's id when the body is one
    resolution: str | None
    resolved_at: datetime | None


@dataclass(frozen=True)
class Resolved:
    """What happened to one dead letter asked for: ``ok`` False with the reason otherwise."""

    id: int
    ok: bool
    detail: str


def _event(body: bytes) -> dict[str, object] | None:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


def _view(row: DeadLetter) -> DeadLetterView:
    event = _event(row.body)
    event_id = event.get("event_id") if event else None
    return DeadLetterView(row.id, row.created_at, row.tenant_id, row.queue, row.routing_key, row.reason, row.detail,
                          len(row.body), str(event_id) if isinstance(event_id, str) else None, row.resolution,
                          row.resolved_at)


def list_dead_letters(factory: sessionmaker[Session], *, include_resolved: bool = False, after_id: int = 0,
                      limit: int = 50) -> list[DeadLetterView]:
    with admin_session(factory) as s:
        return [_view(r) for r in rows.listed(s, unresolved_only=not include_resolved, after_id=after_id, limit=limit)]


def _replay_refusal(session: Session, row: DeadLetter | None) -> tuple[str | None, dict[str, object] | None]:
    """Why this dead letter cannot be replayed (None: it can), and the event to publish."""
    if row is None:
        return "no such dead letter", None
    if row.resolved_at is not None:
        return f"already {row.resolution}", None
    if row.headers.get("task") or row.routing_key not in REPLAYABLE_ROUTING_KEYS:
        return (f"not a domain event (routing key {row.routing_key!r}); a stage task's job was already ended "
                "as worker_lost: discard it"), None
    event = _event(row.body)
    if event is None:
        return "the body is not a JSON object: discard it", None
    try:
        event_id = uuid.UUID(str(event.get("event_id")))
    except ValueError:
        return "the event has no valid event_id: discard it", None
    seen = inbox.status_of(session, event_id)
    if seen is not None:
        return (f"event {event_id} is already in the inbox ({seen}): a replay would be a duplicate; discard it"), None
    return None, event


def replay(factory: sessionmaker[Session], publisher: EventPublisher, ids: list[int]) -> list[Resolved]:
    """Re-publish each dead letter's event and mark it replayed; refusals say why."""
    out = []
    for dead_letter_id in ids:
        with admin_session(factory) as s:
            row = rows.get(s, dead_letter_id)
            refusal, event = _replay_refusal(s, row)
            routing_key = row.routing_key if row is not None else None
        if refusal is not None or event is None or routing_key is None:
            out.append(Resolved(dead_letter_id, False, refusal or "not replayable"))
            continue
        publisher.publish(routing_key, event, message_id=str(event["event_id"]))
        with admin_session(factory) as s:
            rows.resolve(s, dead_letter_id, Resolution.replayed.value)
        log.info("dead_letter.replayed", dead_letter_id=dead_letter_id, routing_key=routing_key,
                 event_id=str(event["event_id"]))
        out.append(Resolved(dead_letter_id, True, f"re-published {routing_key} event {event['event_id']}"))
    return out


def discard(factory: sessionmaker[Session], ids: list[int]) -> list[Resolved]:
    """Mark each dead letter discarded (it is pruned after the grace period)."""
    out = []
    for dead_letter_id in ids:
        with admin_session(factory) as s:
            done = rows.resolve(s, dead_letter_id, Resolution.discarded.value)
            row = None if done else rows.get(s, dead_letter_id)
        if done:
            log.info("dead_letter.discarded", dead_letter_id=dead_letter_id)
            out.append(Resolved(dead_letter_id, True, "discarded"))
        else:
            out.append(Resolved(dead_letter_id, False, f"already {row.resolution}" if row else "no such dead letter"))
    return out
