"""The inbox: every domain event id is received once (idempotent intake of products and reviews)."""

from __future__ import annotations

import uuid

from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from db.enums import InboxStatus
from db.tables import InboxEvent


def record(session: Session, event_id: uuid.UUID, *, tenant_id: str | None, event_type: str,
           status: InboxStatus, detail: str | None = None) -> bool:
    """Insert the inbox row; False when this event id was already received."""
    inserted = session.execute(
        insert(InboxEvent).values(event_id=event_id, tenant_id=tenant_id, event_type=event_type,
                                  status=status.value, detail=detail)
        .on_conflict_do_nothing(index_elements=["event_id"]).returning(InboxEvent.event_id)
    ).scalar_one_or_none()
    return inserted is not None


def mark(session: Session, event_id: uuid.UUID, status: InboxStatus, detail: str) -> None:
    """Change the outcome recorded for an event received in this transaction."""
    row = session.get(InboxEvent, event_id)
    if row is None:
        raise LookupError(f"no inbox row for event {event_id}")
    row.status = status.value
    row.detail = detail
    session.flush()


def status_of(session: Session, event_id: uuid.UUID) -> str | None:
    """The outcome recorded for an event id, or None when it was never received (or was pruned)."""
    row = session.get(InboxEvent, event_id)
    return row.status if row is not None else None
