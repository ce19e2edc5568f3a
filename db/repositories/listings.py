"""Listings with their grounding and embeddings: what persist writes and what reuse reads."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from db.tables import Embedding, Grounding, Listing


def reusable(session: Session, tenant_id: str, image_id: int, model_ids: dict[str, int], *,
             reuse_key: str) -> int | None:
    """A listing of the same image from the same other inputs (``reuse_key``, kept in its
    ``model_input``) by these model versions, with its embedding, that the merchant did not reject."""
    return session.scalar(
        select(Listing.id).join(Embedding, Embedding.listing_id == Listing.id)
        .where(Listing.tenant_id == tenant_id, Listing.image_id == image_id,
               Listing.model_version_id == model_ids["vlm"], Embedding.model_version_id == model_ids["clip"],
               Listing.model_versions["detector"].astext == str(model_ids["detector"]),
               Listing.model_input["reuse_key"].astext == reuse_key, Listing.status != "rejected")
        .order_by(Listing.id).limit(1))


def upsert_grounding(session: Session, *, tenant_id: str, image_id: int, detector_id: int, prompt: str,
                     box: list[float] | None, score: float | None, fallback: bool) -> int:
    stmt = insert(Grounding).values(tenant_id=tenant_id, image_id=image_id, model_version_id=detector_id,
                                    prompt=prompt, box=box, score=score, fallback=fallback)
    return session.execute(stmt.on_conflict_do_update(
        index_elements=["tenant_id", "image_id", "model_version_id", "prompt"],
        set_={"box": stmt.excluded.box, "score": stmt.excluded.score, "fallback": stmt.excluded.fallback},
    ).returning(Grounding.id)).scalar_one()


def insert_listing(session: Session, values: dict[str, Any]) -> tuple[int, bool]:
    """(listing id, created). Idempotent on (tenant, product, product version, vlm version): a
    replay gets the existing row's id and ``created=False``."""
    new_id = session.execute(insert(Listing).values(**values).on_conflict_do_nothing(
        index_elements=["tenant_id", "product_id", "product_version", "model_version_id"]).returning(Listing.id)
    ).scalar_one_or_none()
    if new_id is not None:
        return new_id, True
    existing = session.scalar(select(Listing.id).where(
        Listing.tenant_id == values["tenant_id"], Listing.product_id == values["product_id"],
        Listing.product_version == values["product_version"],
        Listing.model_version_id == values["model_version_id"]))
    assert existing is not None
    return existing, False


def insert_embedding(session: Session, values: dict[str, Any]) -> None:
    """Idempotent on (listing, clip version)."""
    session.execute(insert(Embedding).values(**values).on_conflict_do_nothing(
        index_elements=["listing_id", "model_version_id"]))


def get(session: Session, listing_id: int) -> Listing | None:
    return session.get(Listing, listing_id)


def embeddings_of(session: Session, listing_id: int) -> list[Embedding]:
    return list(session.scalars(select(Embedding).where(Embedding.listing_id == listing_id)))


def grounding(session: Session, grounding_id: int | None) -> Grounding | None:
    return session.get(Grounding, grounding_id) if grounding_id else None
