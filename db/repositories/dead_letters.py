"""Dead letters: messages the broker or the intake gave up on, kept with why and where."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db.tables import DeadLetter


def keep(session: Session, *, tenant_id: str | None, queue: str, routing_key: str | None, reason: str,
         detail: str, headers: dict[str, Any], body: bytes) -> None:
    session.add(DeadLetter(tenant_id=tenant_id, queue=queue, routing_key=routing_key, reason=reason,
                           detail=detail[:2000], headers=headers, body=body))
    session.flush()


def listed(session: Session, *, unresolved_only: bool = True, after_id: int = 0, limit: int = 50) -> list[DeadLetter]:
    """Dead letters in id order after ``after_id`` (by default only those nobody resolved yet)."""
    query = select(DeadLetter).where(DeadLetter.id > after_id).order_by(DeadLetter.id).limit(limit)
    if unresolved_only:
        query = query.where(DeadLetter.resolved_at.is_(None))
    return list(session.scalars(query))


def get(session: Session, dead_letter_id: int) -> DeadLetter | None:
    return session.get(DeadLetter, dead_letter_id)


def resolve(session: Session, dead_letter_id: int, resolution: str) -> bool:
    """Mark a dead letter ``replayed`` or ``discarded``, once: False when it was already resolved
    (or does not exist)."""
    done = session.execute(
        update(DeadLetter).where(DeadLetter.id == dead_letter_id, DeadLetter.resolved_at.is_(None))
        .values(resolved_at=func.now(), resolution=resolution).execution_options(synchronize_session=False))
    return done.rowcount == 1
