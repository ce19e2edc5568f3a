"""Images: content-addressed rows per tenant, their use by products, and near-duplicate groups."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from db.tables import DuplicateGroup, DuplicateMember, Image, Product, ProductImage


@dataclass(frozen=True)
class NewImage:
    sha256: str
    phash: str
    dhash: str
    width: int
    height: int
    byte_size: int
    format: str
    storage_uri: str


@dataclass(frozen=True)
class NearCandidate:
    image_id: int
    storage_uri: str
    hamming: int  # the smaller of the pHash and dHash distances


def upsert(session: Session, tenant_id: str, image: NewImage) -> tuple[int, bool]:
    """(image id, is_new). The same bytes are one row per tenant."""
    new_id = session.execute(
        insert(Image).values(tenant_id=tenant_id, sha256=image.sha256, phash=image.phash, dhash=image.dhash,
                             width=image.width, height=image.height, byte_size=image.byte_size,
                             format=image.format, storage_uri=image.storage_uri)
        .on_conflict_do_nothing(index_elements=["tenant_id", "sha256"]).returning(Image.id)
    ).scalar_one_or_none()
    if new_id is not None:
        return new_id, True
    existing = session.scalar(select(Image.id).where(Image.tenant_id == tenant_id, Image.sha256 == image.sha256))
    assert existing is not None
    return existing, False


def link_to_product(session: Session, *, tenant_id: str, product_id: int, product_version: int, position: int,
                    image_id: int, role: str, source_url: str) -> None:
    session.execute(insert(ProductImage).values(
        tenant_id=tenant_id, product_id=product_id, product_version=product_version, position=position,
        image_id=image_id, role=role, source_url=source_url[:2048]).on_conflict_do_nothing())


_NEAR = text(
    "SELECT id, storage_uri, least(bit_count(phash # CAST(:p AS bit(64))), bit_count(dhash # CAST(:d AS bit(64))))"
    " AS dist FROM (("
    "  SELECT id, storage_uri, phash, dhash FROM images WHERE tenant_id = :t AND id <> :id"
    "  ORDER BY phash <~> CAST(:p AS bit(64)) LIMIT :k"
    ") UNION ("
    "  SELECT id, storage_uri, phash, dhash FROM images WHERE tenant_id = :t AND id <> :id"
    "  ORDER BY dhash <~> CAST(:d AS bit(64)) LIMIT :k"
    ")) c ORDER BY dist")


def near_candidates(session: Session, tenant_id: str, image_id: int, *, phash: str, dhash: str, k: int,
                    max_hamming: int) -> list[NearCandidate]:
    """The tenant's images closest to these hashes (HNSW Hamming search on both), nearest first."""
    rows = session.execute(_NEAR, {"p": phash, "d": dhash, "t": tenant_id, "id": image_id, "k": k}).all()
    return [NearCandidate(r.id, r.storage_uri, r.dist) for r in rows if r.dist <= max_hamming]


def record_near_duplicate(session: Session, tenant_id: str, image_id: int, match_id: int,
                          hamming: int, inliers: int) -> None:
    """Put ``image_id`` in ``match_id``'s duplicate group (created with the match as representative)."""
    group_id = session.scalar(select(DuplicateMember.group_id).where(DuplicateMember.image_id == match_id))
    if group_id is None:
        group_id = session.execute(
            insert(DuplicateGroup).values(tenant_id=tenant_id, representative_image_id=match_id)
            .on_conflict_do_nothing(index_elements=["representative_image_id"]).returning(DuplicateGroup.id)
        ).scalar_one_or_none() or session.scalar(
            select(DuplicateGroup.id).where(DuplicateGroup.representative_image_id == match_id))
        session.execute(insert(DuplicateMember).values(group_id=group_id, image_id=match_id, tenant_id=tenant_id,
                                                       method="near", hamming_distance=0, inliers=None)
                        .on_conflict_do_nothing())
    session.execute(insert(DuplicateMember).values(group_id=group_id, image_id=image_id, tenant_id=tenant_id,
                                                   method="near", hamming_distance=hamming, inliers=inliers)
                    .on_conflict_do_nothing())


def product_using(session: Session, tenant_id: str, image_id: int, *, exclude_product: int) -> str | None:
    """The external id of another product of the tenant that uses this image, if any."""
    return session.scalar(
        select(Product.external_id).join(ProductImage, ProductImage.product_id == Product.id)
        .where(ProductImage.image_id == image_id, ProductImage.tenant_id == tenant_id,
               Product.id != exclude_product).limit(1))
