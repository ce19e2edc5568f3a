"""Outbox rows: written in the transaction that caused them, published after it committed."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import func, select, update
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


def lock_pending_of(session: Session, ids: list[int]) -> list[int]:
    """Of ``ids``, those still unpublished, in id order, locked for this transaction; rows another
    relay holds are skipped (that relay publishes them). Ids only: the caller has the payloads."""
    return list(session.scalars(
        select(OutboxMessage.id).where(OutboxMessage.id.in_(ids), OutboxMessage.published_at.is_(None))
        .order_by(OutboxMessage.id).with_for_update(skip_locked=True)))


def mark_published(session: Session, ids: list[int]) -> None:
    """One statement for the rows this relay published (each one more attempt)."""
    if ids:
        session.execute(update(OutboxMessage).where(OutboxMessage.id.in_(ids))
                        .values(published_at=func.clock_timestamp(), publish_attempts=OutboxMessage.publish_attempts + 1))


def count_failed_attempt(session: Session, row_id: int) -> None:
    session.execute(update(OutboxMessage).where(OutboxMessage.id == row_id)
                    .values(publish_attempts=OutboxMessage.publish_attempts + 1))
