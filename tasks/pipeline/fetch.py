"""Fetch + dedup (CPU): download each image, decode safely, store it content-addressed, record
exact and near duplicates, and decide whether model work is needed at all.

No transaction is held open across the network: the job is claimed, the images are fetched,
then everything learned is written in one short transaction.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import structlog
from sqlalchemy import select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from db.engine import job_session
from db.enums import Stage
from db.tables import DuplicateGroup, DuplicateMember, Embedding, EnrichmentJob, Image, Listing, Product, ProductImage
from models.dedup import CANDIDATE_K, CANDIDATE_MAX_HAMMING, DuplicateCandidate
from models.errors import ImageRejected
from models.hashing import perceptual_hashes, sha256_hex
from models.images import decode_image
from tasks import faults
from tasks.pipeline import jobs
from tasks.errors import ErrorCode, PipelineError
from tasks.pipeline.outbox import enqueue_task
from tasks.runtime import Runtime
from tasks.io.blobs import original_key

log = structlog.get_logger(__name__)


@dataclass
class StoredImage:
    url: str
    role: str
    sha256: str
    phash: str
    dhash: str
    width: int
    height: int
    byte_size: int
    format: str
    storage_uri: str
    image: Any = field(default=None, repr=False)  # decoded RGB, kept for dedup: never decode twice


@dataclass
class FetchOutcome:
    next_stage: Stage | None  # None: the job already ended or is handled by another task
    duplicates: list[dict[str, Any]] = field(default_factory=list)


def _fetch_all(runtime: Runtime, urls: list[list[str]], tenant_id: str, merchant_id: str) -> list[StoredImage]:
    stored: list[StoredImage] = []
    for url, role in urls:
        fetched = runtime.fetcher.fetch(url, tenant_id=tenant_id, merchant_id=merchant_id)
        try:
            decoded = decode_image(fetched.data, runtime.image_limits)
        except ImageRejected as exc:
            raise PipelineError(ErrorCode.image_rejected, f"{_safe(url)}: {exc.detail}") from exc
        sha = sha256_hex(fetched.data)
        hashes = perceptual_hashes(decoded.image)
        uri = runtime.blobs.put(original_key(tenant_id, sha), fetched.data)
        stored.append(StoredImage(url, role, sha, hashes.phash, hashes.dhash, decoded.width, decoded.height,
                                  len(fetched.data), decoded.format, uri, decoded.image))
    return stored


def _safe(url: str) -> str:
    return url.split("?", 1)[0][:200]


def _upsert_image(session: Session, tenant_id: str, img: StoredImage) -> tuple[int, bool]:
    """(image id, is_new). Content addressing: the same bytes are one row per tenant."""
    new_id = session.execute(
        insert(Image).values(tenant_id=tenant_id, sha256=img.sha256, phash=img.phash, dhash=img.dhash,
                             width=img.width, height=img.height, byte_size=img.byte_size, format=img.format,
                             storage_uri=img.storage_uri)
        .on_conflict_do_nothing(index_elements=["tenant_id", "sha256"]).returning(Image.id)
    ).scalar_one_or_none()
    if new_id is not None:
        return new_id, True
    existing = session.scalar(select(Image.id).where(Image.tenant_id == tenant_id, Image.sha256 == img.sha256))
    assert existing is not None
    return existing, False


def _near_candidates(session: Session, tenant_id: str, image_id: int, img: StoredImage) -> list[tuple[int, str, int]]:
    rows = session.execute(text(
        "SELECT id, storage_uri, least(bit_count(phash # CAST(:p AS bit(64))), bit_count(dhash # CAST(:d AS bit(64))))"
        " AS dist FROM (("
        "  SELECT id, storage_uri, phash, dhash FROM images WHERE tenant_id = :t AND id <> :id"
        "  ORDER BY phash <~> CAST(:p AS bit(64)) LIMIT :k"
        ") UNION ("
        "  SELECT id, storage_uri, phash, dhash FROM images WHERE tenant_id = :t AND id <> :id"
        "  ORDER BY dhash <~> CAST(:d AS bit(64)) LIMIT :k"
        ")) c ORDER BY dist"), {"p": img.phash, "d": img.dhash, "t": tenant_id, "id": image_id, "k": CANDIDATE_K}).all()
    return [(r.id, r.storage_uri, r.dist) for r in rows if r.dist <= CANDIDATE_MAX_HAMMING]


def _record_near_duplicate(session: Session, tenant_id: str, image_id: int, match_id: int,
                           hamming: int, inliers: int) -> None:
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


def _candidate_features(runtime: Runtime, image_id: int, uri: str) -> Any:
    """ORB features of a stored image, from the per-process cache or decoded once from storage."""
    cached = runtime.feature_cache.get(image_id)
    if cached is None:
        image = decode_image(runtime.blobs.get(uri), runtime.image_limits).image
        cached = runtime.feature_cache.put(image_id, runtime.dedup_verifier.features(image))
    return cached


def _verify_near(runtime: Runtime, session: Session, tenant_id: str, image_id: int,
                 img: StoredImage) -> dict[str, Any] | None:
    candidates = _near_candidates(session, tenant_id, image_id, img)
    query_features = runtime.feature_cache.put(image_id, runtime.dedup_verifier.features(img.image))
    if not candidates:
        return None
    loaded = [DuplicateCandidate(cid, None, dist, features=_candidate_features(runtime, cid, uri))
              for cid, uri, dist in candidates]
    confirmed = [runtime.dedup_verifier.match_features(query_features, c.features, image_id=c.image_id,
                                                       hamming=c.hamming) for c in loaded]
    confirmed = [m for m in confirmed if m.confirmed]
    if not confirmed:
        return None
    best = max(confirmed, key=lambda m: m.inliers)
    _record_near_duplicate(session, tenant_id, image_id, best.image_id, best.hamming, best.inliers)
    return {"image_url": img.url, "kind": "near", "duplicate_of_image_id": best.image_id,
            "hamming_distance": best.hamming, "inliers": best.inliers}


def _product_using(session: Session, tenant_id: str, image_id: int, exclude_product: int) -> str | None:
    return session.scalar(
        select(Product.external_id).join(ProductImage, ProductImage.product_id == Product.id)
        .where(ProductImage.image_id == image_id, ProductImage.tenant_id == tenant_id,
               Product.id != exclude_product).limit(1))


def _reusable_listing(session: Session, tenant_id: str, image_id: int, model_ids: dict[str, int]) -> int | None:
    """A listing of the same image by the current models (and its embedding): reuse, no model work."""
    return session.scalar(
        select(Listing.id).join(Embedding, Embedding.listing_id == Listing.id)
        .where(Listing.tenant_id == tenant_id, Listing.image_id == image_id,
               Listing.model_version_id == model_ids["vlm"], Embedding.model_version_id == model_ids["clip"],
               Listing.model_versions["detector"].astext == str(model_ids["detector"]))
        .order_by(Listing.id).limit(1))


def fetch_and_dedup(runtime: Runtime, job_id: int, task_id: str, model_ids: dict[str, int]) -> FetchOutcome:
    started = time.perf_counter()
    with job_session(runtime.session_factory, job_id) as session:
        job = jobs.claim(session, job_id, Stage.fetch, task_id, runtime.retry.max_stage_attempts)
        if job is None:
            return FetchOutcome(None)
        tenant_id, product_id, urls = job.tenant_id, job.product_id, job.work["image_urls"]
        merchant_id = session.get(Product, product_id).merchant_id  # type: ignore[union-attr]
        external_id = session.get(Product, product_id).external_id  # type: ignore[union-attr]
    faults.hit("fetch.claimed", external_id=external_id, job_id=job_id)

    stored = _fetch_all(runtime, urls, tenant_id, merchant_id)
    fetched_ms = (time.perf_counter() - started) * 1000

    with job_session(runtime.session_factory, job_id) as session:
        job = session.get(EnrichmentJob, job_id, with_for_update=True)
        if job is None or job.status in jobs.FINAL:
            return FetchOutcome(None)
        duplicates: list[dict[str, Any]] = []
        image_ids: list[int] = []
        for position, img in enumerate(stored):
            image_id, is_new = _upsert_image(session, tenant_id, img)
            image_ids.append(image_id)
            session.execute(insert(ProductImage).values(
                tenant_id=tenant_id, product_id=product_id, product_version=job.product_version, position=position,
                image_id=image_id, role=img.role, source_url=img.url[:2048]).on_conflict_do_nothing())
            if not is_new:
                other = _product_using(session, tenant_id, image_id, product_id)
                if other is not None:  # the same bytes under another product (not an older version of this one)
                    duplicates.append({"image_url": img.url, "kind": "exact", "duplicate_of_product": other,
                                       "hamming_distance": 0, "inliers": None})
                continue
            near = _verify_near(runtime, session, tenant_id, image_id, img)
            if near is not None:
                other = _product_using(session, tenant_id, near.pop("duplicate_of_image_id"), product_id)
                duplicates.append({**near, "duplicate_of_product": other})
        primary = next((i for i, s in enumerate(stored) if s.role == "primary"), 0)
        reuse = _reusable_listing(session, tenant_id, image_ids[primary], model_ids)
        nxt = Stage.persist if reuse is not None else Stage.model
        jobs.advance(session, job, nxt, work={
            "image_ids": image_ids, "primary_image_id": image_ids[primary],
            "primary_uri": stored[primary].storage_uri, "duplicates": duplicates, "reuse_listing_id": reuse,
        }, timings={"fetch": fetched_ms, "dedup": (time.perf_counter() - started) * 1000 - fetched_ms})
        enqueue_task(session, "catalog.model" if nxt is Stage.model else "catalog.persist", job_id,
                     queue="gpu" if nxt is Stage.model else "cpu", tenant_id=tenant_id)
    log.info("fetch.done", job_id=job_id, images=len(stored), duplicates=len(duplicates), reuse=reuse is not None)
    return FetchOutcome(nxt, duplicates)
