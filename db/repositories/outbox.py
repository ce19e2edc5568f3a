"""Outbox rows: written in the transaction that caused them, published after it committed."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.tables import OutboxMessage


def add(session: Session, *, tenant_id: str | None, message_id: uuid.UUID, routing_key: str,
        payload: dict[str, Any]) -> OutboxMessage:
    row = OutboxMessage(tenant_id=tenant_id, message_id=message_id, routing_key=routing_key, payload=payload)
    session.add(row)
    session.flush()
    return row


def lock_pending(session: Session, limit: int) -> list[OutboxMessage]:
    """Unpublished rows in id order, skipping rows another relay holds."""
    return list(session.scalars(
        select(OutboxMessage).where(OutboxMessage.published_at.is_(None))
        .order_by(OutboxMessage.id).limit(limit).with_for_update(skip_locked=True)))
