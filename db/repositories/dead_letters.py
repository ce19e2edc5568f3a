"""Dead letters: messages the broker or the intake gave up on, kept with why and where."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from db.tables import DeadLetter


def keep(session: Session, *, tenant_id: str | None, queue: str, routing_key: str | None, reason: str,
         detail: str, headers: dict[str, Any], body: bytes) -> None:
    session.add(DeadLetter(tenant_id=tenant_id, queue=queue, routing_key=routing_key, reason=reason,
                           detail=detail[:2000], headers=headers, body=body))
    session.flush()
