"""Merchant decisions on pairs of images (``duplicate.reviewed``): one current row per pair.

A pair is two SHA-256 digests in sorted order, so a decision is about content: it holds for the
tenant's images whenever they are stored, and whichever of the two is the query of a later dedup
pass. The current decision is the one with the latest ``occurred_at`` (the event's own time, not
when it arrived); equal times are ordered by event id, so every delivery order ends the same.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import or_, select, tuple_
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session
from sqlalchemy.sql import func

from db.enums import PairDecision
from db.tables import DuplicateDecision


def pair_key(sha_x: str, sha_y: str) -> tuple[str, str]:
    """The stored (a, b) order of two digests; ValueError for one image twice."""
    x, y = sha_x.lower(), sha_y.lower()
    if x == y:
        raise ValueError("a duplicate decision needs two different images")
    return (x, y) if x < y else (y, x)


@dataclass(frozen=True)
class NewDecision:
    tenant_id: str
    image_a_sha256: str
    image_b_sha256: str
    decision: PairDecision
    event_id: uuid.UUID
    occurred_at: datetime
    merchant_id: str
    reviewer: str
    reason: str | None = None


def record(session: Session, new: NewDecision) -> bool:
    """Store ``new`` unless a decision with a later (occurred_at, event_id) is already current for
    the pair; True when ``new`` is the current decision afterwards."""
    a, b = pair_key(new.image_a_sha256, new.image_b_sha256)
    values = {"tenant_id": new.tenant_id, "image_a_sha256": a, "image_b_sha256": b,
              "decision": new.decision.value, "event_id": new.event_id, "occurred_at": new.occurred_at,
              "merchant_id": new.merchant_id, "reviewer": new.reviewer, "reason": new.reason}
    stmt = insert(DuplicateDecision).values(**values)
    replace = {k: stmt.excluded[k] for k in ("decision", "event_id", "occurred_at", "merchant_id", "reviewer",
                                             "reason")}
    stmt = stmt.on_conflict_do_update(
        index_elements=["tenant_id", "image_a_sha256", "image_b_sha256"],
        set_={**replace, "updated_at": func.now()},
        where=tuple_(DuplicateDecision.occurred_at, DuplicateDecision.event_id)
        < tuple_(stmt.excluded.occurred_at, stmt.excluded.event_id),
    ).returning(DuplicateDecision.event_id)
    return session.execute(stmt).scalar_one_or_none() == new.event_id


def current(session: Session, tenant_id: str, sha_x: str, sha_y: str) -> DuplicateDecision | None:
    a, b = pair_key(sha_x, sha_y)
    return session.scalar(select(DuplicateDecision).where(
        DuplicateDecision.tenant_id == tenant_id, DuplicateDecision.image_a_sha256 == a,
        DuplicateDecision.image_b_sha256 == b).execution_options(populate_existing=True))


def partners(session: Session, tenant_id: str, sha256: str) -> dict[str, PairDecision]:
    """{the other image's sha256: decision} for every current decision involving ``sha256``."""
    sha = sha256.lower()
    rows = session.execute(select(DuplicateDecision.image_a_sha256, DuplicateDecision.image_b_sha256,
                                  DuplicateDecision.decision)
                           .where(DuplicateDecision.tenant_id == tenant_id,
                                  or_(DuplicateDecision.image_a_sha256 == sha,
                                      DuplicateDecision.image_b_sha256 == sha))).all()
    return {(r.image_b_sha256 if r.image_a_sha256 == sha else r.image_a_sha256): PairDecision(r.decision)
            for r in rows}


def not_duplicate_among(session: Session, tenant_id: str, digests: list[str]) -> set[tuple[str, str]]:
    """The (a, b) pairs of these digests whose current decision is ``not_duplicate``."""
    if len(digests) < 2:
        return set()
    rows = session.execute(select(DuplicateDecision.image_a_sha256, DuplicateDecision.image_b_sha256)
                           .where(DuplicateDecision.tenant_id == tenant_id,
                                  DuplicateDecision.decision == PairDecision.not_duplicate.value,
                                  DuplicateDecision.image_a_sha256.in_(digests),
                                  DuplicateDecision.image_b_sha256.in_(digests))).all()
    return {(r.image_a_sha256, r.image_b_sha256) for r in rows}
