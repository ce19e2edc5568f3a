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
from sqlalchemy.orm import Session

from db.engine import job_session
from db.enums import Stage
from db.repositories import images, listings, model_versions, products
from db.repositories import jobs as job_rows
from models.dedup import CANDIDATE_K, CANDIDATE_MAX_HAMMING, DuplicateCandidate
from models.errors import ImageRejected
from models.hashing import perceptual_hashes, sha256_hex
from models.images import decode_image
from tasks import faults
from tasks.pipeline import jobs
from tasks.errors import ErrorCode, PipelineError
from tasks.pipeline.work import DuplicateFound, EnrichRequest, FetchedImages
from tasks.runtime import Runtime
from tasks.io.blobs import original_key

log = structlog.get_logger(__name__)


@dataclass
class StoredImage:
    url: str
    role: str
    row: images.NewImage  # what the images table records
    image: Any = field(default=None, repr=False)  # decoded RGB, kept for dedup: never decode twice


@dataclass
class FetchOutcome:
    next_stage: Stage | None  # None: the job already ended or is handled by another task
    duplicates: list[DuplicateFound] = field(default_factory=list)


def _fetch_all(runtime: Runtime, request: EnrichRequest, tenant_id: str, merchant_id: str) -> list[StoredImage]:
    stored: list[StoredImage] = []
    for ref in request.images:
        url, role = ref.url, ref.role
        fetched = runtime.fetcher.fetch(url, tenant_id=tenant_id, merchant_id=merchant_id)
        try:
            decoded = decode_image(fetched.data, runtime.image_limits)
        except ImageRejected as exc:
            raise PipelineError(ErrorCode.image_rejected, f"{_safe(url)}: {exc.detail}") from exc
        sha = sha256_hex(fetched.data)
        hashes = perceptual_hashes(decoded.image)
        uri = runtime.blobs.put(original_key(tenant_id, sha), fetched.data)
        row = images.NewImage(sha256=sha, phash=hashes.phash, dhash=hashes.dhash, width=decoded.width,
                              height=decoded.height, byte_size=len(fetched.data), format=decoded.format,
                              storage_uri=uri)
        stored.append(StoredImage(url, role, row, decoded.image))
    return stored


def _safe(url: str) -> str:
    return url.split("?", 1)[0][:200]


def _candidate_features(runtime: Runtime, image_id: int, uri: str) -> Any:
    """ORB features of a stored image, from the per-process cache or decoded once from storage."""
    cached = runtime.feature_cache.get(image_id)
    if cached is None:
        image = decode_image(runtime.blobs.get(uri), runtime.image_limits).image
        cached = runtime.feature_cache.put(image_id, runtime.dedup_verifier.features(image))
    return cached


def _verify_near(runtime: Runtime, session: Session, tenant_id: str, image_id: int,
                 img: StoredImage) -> tuple[int, int, int] | None:
    """(matched image id, hamming, inliers) of the best geometrically confirmed near duplicate."""
    candidates = images.near_candidates(session, tenant_id, image_id, phash=img.row.phash, dhash=img.row.dhash,
                                        k=CANDIDATE_K, max_hamming=CANDIDATE_MAX_HAMMING)
    query_features = runtime.feature_cache.put(image_id, runtime.dedup_verifier.features(img.image))
    if not candidates:
        return None
    loaded = [DuplicateCandidate(c.image_id, None, c.hamming, features=_candidate_features(runtime, c.image_id,
                                                                                          c.storage_uri))
              for c in candidates]
    confirmed = [runtime.dedup_verifier.match_features(query_features, c.features, image_id=c.image_id,
                                                       hamming=c.hamming) for c in loaded]
    confirmed = [m for m in confirmed if m.confirmed]
    if not confirmed:
        return None
    best = max(confirmed, key=lambda m: m.inliers)
    images.record_near_duplicate(session, tenant_id, image_id, best.image_id, best.hamming, best.inliers)
    return best.image_id, best.hamming, best.inliers


def _reusable(session: Session, tenant_id: str, image_id: int) -> int | None:
    """A listing of this image by the versions the registry serves now (the CPU worker needs no
    model identity of its own): reuse it, no model work. None until every kind has an active version."""
    active = {kind: row.id for kind, row in model_versions.active(session).items()}
    if set(active) != {"detector", "vlm", "clip"}:
        return None
    return listings.reusable(session, tenant_id, image_id, active)


def fetch_and_dedup(runtime: Runtime, job_id: int, task_id: str) -> FetchOutcome:
    started = time.perf_counter()
    with job_session(runtime.session_factory, job_id) as session:
        job = jobs.claim(session, job_id, Stage.fetch, task_id, runtime.retry.max_stage_attempts)
        if job is None:
            return FetchOutcome(None)
        tenant_id, product_id, request = job.tenant_id, job.product_id, EnrichRequest.of(job.work)
        product = products.get(session, product_id)
        assert product is not None
        merchant_id, external_id = product.merchant_id, product.external_id
    faults.hit("fetch.claimed", external_id=external_id, job_id=job_id)

    stored = _fetch_all(runtime, request, tenant_id, merchant_id)
    fetched_ms = (time.perf_counter() - started) * 1000

    with job_session(runtime.session_factory, job_id) as session:
        job = job_rows.lock(session, job_id)
        if job is None or job.status in jobs.FINAL:
            return FetchOutcome(None)
        duplicates: list[DuplicateFound] = []
        image_ids: list[int] = []
        for position, img in enumerate(stored):
            image_id, is_new = images.upsert(session, tenant_id, img.row)
            image_ids.append(image_id)
            images.link_to_product(session, tenant_id=tenant_id, product_id=product_id,
                                   product_version=job.product_version, position=position, image_id=image_id,
                                   role=img.role, source_url=img.url)
            if not is_new:
                other = images.product_using(session, tenant_id, image_id, exclude_product=product_id)
                if other is not None:  # the same bytes under another product (not an older version of this one)
                    duplicates.append(DuplicateFound(img.url, "exact", other, 0, None))
                continue
            near = _verify_near(runtime, session, tenant_id, image_id, img)
            if near is not None:
                match_id, hamming, inliers = near
                other = images.product_using(session, tenant_id, match_id, exclude_product=product_id)
                duplicates.append(DuplicateFound(img.url, "near", other, hamming, inliers))
        primary = next((i for i, s in enumerate(stored) if s.role == "primary"), 0)
        reuse = _reusable(session, tenant_id, image_ids[primary])
        nxt = Stage.persist if reuse is not None else jobs.STAGES[Stage.fetch].next
        assert nxt is not None
        handoff = FetchedImages(image_ids=tuple(image_ids), primary_image_id=image_ids[primary],
                                primary_uri=stored[primary].row.storage_uri, duplicates=tuple(duplicates),
                                reuse_listing_id=reuse)
        jobs.hand_off(session, job, nxt, handoff, timings={
            "fetch": fetched_ms, "dedup": (time.perf_counter() - started) * 1000 - fetched_ms})
    log.info("fetch.done", job_id=job_id, images=len(stored), duplicates=len(duplicates), reuse=reuse is not None)
    return FetchOutcome(nxt, duplicates)
