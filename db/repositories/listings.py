"""Listings with their grounding and embeddings: what persist writes and what reuse reads."""

from __future__ import annotations

from dataclasses import dataclass

from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from db.tables import Embedding, Grounding, Listing, PhotoEmbedding


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


def insert_photo_embeddings(session: Session, rows: list[dict[str, Any]]) -> None:
    """Each photo's own vector; idempotent on (listing, image, clip version)."""
    if rows:
        session.execute(insert(PhotoEmbedding).values(rows).on_conflict_do_nothing(
            index_elements=["listing_id", "image_id", "model_version_id"]))


@dataclass(frozen=True)
class KnownPhoto:
    """What an earlier job already derived from one photo under the served detector and clip
    versions: its grounding for the category's prompt and, when recorded, the crop's vector."""

    image_id: int
    prompt: str
    box: list[float] | None
    score: float | None
    fallback: bool
    embedding: list[float] | None


def known_photos(session: Session, image_ids: list[int], *, detector_id: int, clip_id: int) -> list[KnownPhoto]:
    """Groundings of these images by ``detector_id`` (every prompt), each with the vector of its crop
    by ``clip_id`` when one was stored: one query for a whole batch."""
    if not image_ids:
        return []
    vector = (select(PhotoEmbedding.embedding).where(PhotoEmbedding.grounding_id == Grounding.id,
                                                     PhotoEmbedding.model_version_id == clip_id)
              .limit(1).scalar_subquery())
    rows = session.execute(select(Grounding.image_id, Grounding.prompt, Grounding.box, Grounding.score,
                                  Grounding.fallback, vector.label("embedding"))
                           .where(Grounding.image_id.in_(image_ids), Grounding.model_version_id == detector_id))
    return [KnownPhoto(r.image_id, r.prompt, r.box, r.score, r.fallback,
                       [float(x) for x in r.embedding] if r.embedding is not None else None) for r in rows]


def photo_embeddings_of(session: Session, listing_id: int) -> list[PhotoEmbedding]:
    return list(session.scalars(select(PhotoEmbedding).where(PhotoEmbedding.listing_id == listing_id)
                                .order_by(PhotoEmbedding.position, PhotoEmbedding.model_version_id)))


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
