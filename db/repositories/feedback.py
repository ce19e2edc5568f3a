"""Merchant reviews as rows: the reviewed listing, one ``review_feedback`` row per event, its field errors.

A review is applied in the caller's transaction; these functions only read, add and flush.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.tables import FieldError, Listing, Product, ReviewFeedback


def lock_listing_with_merchant(session: Session, listing_id: int) -> tuple[Listing, str] | None:
    """The listing and its product's merchant id, the listing row locked until the transaction ends
    (concurrent reviews of one listing apply one after the other); None when it does not exist."""
    row = session.execute(
        select(Listing, Product.merchant_id).join(Product, Product.id == Listing.product_id)
        .where(Listing.id == listing_id).with_for_update(of=Listing)
    ).one_or_none()
    return None if row is None else (row[0], row[1])


def feedback_id_for_event(session: Session, event_id: uuid.UUID) -> int | None:
    """The ``review_feedback`` id recorded for this event (None when the event was refused)."""
    return session.scalar(select(ReviewFeedback.id).where(ReviewFeedback.event_id == event_id))


def add_feedback(session: Session, *, tenant_id: str, event_id: uuid.UUID, listing_id: int, decision: str,
                 reviewer: str, reason: str | None, corrected: dict[str, Any]) -> ReviewFeedback:
    """Insert one review (flushed: the returned row has its id)."""
    feedback = ReviewFeedback(tenant_id=tenant_id, event_id=event_id, listing_id=listing_id,
                              decision=decision, reviewer=reviewer, reason=reason, corrected=corrected)
    session.add(feedback)
    session.flush()
    return feedback


def replace_content(session: Session, listing: Listing, content: dict[str, Any]) -> None:
    """Serve a merchant-corrected ``content``; the content as generated is kept in
    ``generated_content`` by the first edit and never overwritten by a later one (flushed)."""
    if listing.generated_content is None:
        listing.generated_content = listing.content
    listing.content = content
    session.flush()


def add_field_errors(session: Session, feedback: ReviewFeedback, listing: Listing,
                     diffs: dict[str, tuple[Any, Any]]) -> None:
    """One ``field_errors`` row per ``{field: (model value, merchant value)}``, stamped with the
    listing's category and the model versions that produced it (flushed)."""
    session.add_all(
        FieldError(tenant_id=feedback.tenant_id, feedback_id=feedback.id, listing_id=listing.id,
                   category=listing.category, field=name, model_value=model_value,
                   merchant_value=merchant_value, model_versions=listing.model_versions)
        for name, (model_value, merchant_value) in diffs.items()
    )
    session.flush()
