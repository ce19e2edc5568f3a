"""Fetch + dedup (CPU): download each image, decode safely, store it content-addressed, record
exact and near duplicates, and decide whether model work is needed at all.

No transaction is open across the network or while candidates are verified (ORB features of
stored images come from blob storage, written there at ingest: ``tasks.pipeline.dedup_features``):
the job is claimed; the images are fetched; one short
transaction stores and links them and finds near-duplicate candidates; the candidates are verified
with no transaction open; a last short transaction re-locks the job, checks that this task still
holds its fetch stage, records the duplicate groups and hands off. A redelivery that finds the
images already stored by its own earlier attempt treats them as this version's own, so it reaches
the same groups and the same hand-off.
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
from db.tables import EnrichmentJob
from models.dedup import CANDIDATE_K, CANDIDATE_MAX_HAMMING, DuplicateMatch
from models.errors import ImageRejected
from models.hashing import candidate_hashes, sha256_hex
from models.images import decode_image
from tasks import faults
from tasks.pipeline import decisions, dedup_features, jobs
from tasks.errors import ErrorCode, PipelineError
from tasks.pipeline.policy import generates_listing
from tasks.pipeline.reuse import reuse_key, with_photos
from tasks.pipeline.work import Claims, DuplicateFound, EnrichRequest, FetchedImages
from tasks.runtime import Runtime
from tasks.io.blobs import original_key

log = structlog.get_logger(__name__)


@dataclass
class StoredImage:
    url: str
    role: str
    row: images.NewImage  # what the images table records
    data: bytes = field(default=b"", repr=False)  # the fetched bytes
    image: Any = field(default=None, repr=False)  # decoded RGB, kept for dedup: never decode twice
    mirrored: tuple[str, str] | None = None  # (pHash, dHash) of the trimmed image mirrored: search only

    def decoded(self, runtime: Runtime) -> Any:
        """The decoded image, with the mirrored hashes that go with it; an image whose bytes were already
        stored is decoded only here, when it needs a near-duplicate search after all (``_store``)."""
        if self.image is None:
            decoded, _, self.mirrored = _describe(runtime, self.url, self.data)
            self.image = decoded.image
        return self.image


@dataclass
class FetchOutcome:
    next_stage: Stage | None  # None: the job already ended or is handled by another task
    duplicates: list[DuplicateFound] = field(default_factory=list)


def _describe(runtime: Runtime, url: str, data: bytes) -> tuple[Any, Any, tuple[str, str]]:
    """(decoded image, its hashes, its mirrored hashes) of fetched bytes: the stage's CPU work per new image."""
    try:
        decoded = decode_image(data, runtime.image_limits)
    except ImageRejected as exc:
        raise PipelineError(ErrorCode.image_rejected, f"{_safe(url)}: {exc.detail}") from exc
    hashes = candidate_hashes(decoded.image)
    return decoded, hashes, (hashes.mirrored.phash, hashes.mirrored.dhash)


def _fetch_all(runtime: Runtime, request: EnrichRequest, tenant_id: str, merchant_id: str) -> list[tuple[str, str, bytes]]:
    """(url, role, bytes) of each image of the request, in order: the network part, no transaction open."""
    return [(ref.url, ref.role, runtime.fetcher.fetch(ref.url, tenant_id=tenant_id, merchant_id=merchant_id).data)
            for ref in request.images]


def _describe_all(runtime: Runtime, job_id: int, tenant_id: str,
                  fetched: list[tuple[str, str, bytes]]) -> list[StoredImage]:
    """The images rows to store. Bytes the tenant already stored (a product update that kept its photos, a
    re-upload) take the stored row as it is, looked up in one short read: they were decoded, checked and
    hashed when first stored, and the original is already in blob storage under its content address. Only
    new bytes are decoded, hashed and put."""
    digests = [sha256_hex(data) for _, _, data in fetched]
    with job_session(runtime.session_factory, job_id) as session:
        known = images.stored_rows(session, tenant_id, sorted(set(digests)))
    stored: list[StoredImage] = []
    for (url, role, data), sha in zip(fetched, digests):
        twin = next((img for img in stored if img.row.sha256 == sha), None)
        if twin is not None:
            stored.append(StoredImage(url, role, twin.row, data, twin.image, twin.mirrored))
            continue
        if sha in known:
            stored.append(StoredImage(url, role, known[sha], data))
            continue
        decoded, hashes, mirrored = _describe(runtime, url, data)
        uri = runtime.blobs.put(original_key(tenant_id, sha), data)
        row = images.NewImage(sha256=sha, phash=hashes.plain.phash, dhash=hashes.plain.dhash,
                              phash_trimmed=hashes.trimmed.phash, dhash_trimmed=hashes.trimmed.dhash,
                              phash_centre=hashes.centre.phash, dhash_centre=hashes.centre.dhash,
                              width=decoded.width, height=decoded.height, byte_size=len(data),
                              format=decoded.format, storage_uri=uri)
        stored.append(StoredImage(url, role, row, data, decoded.image, mirrored))
    return stored


def _safe(url: str) -> str:
    return url.split("?", 1)[0][:200]


@dataclass(frozen=True)
class _Seen:
    """What the store transaction learned about one distinct image of this product version."""

    img: StoredImage
    image_id: int
    exact_of: str | None = None  # another product of the tenant with the same bytes
    near_check: bool = False  # this version brought the image in: look for near duplicates
    candidates: tuple[images.NearCandidate, ...] = ()


def _store(runtime: Runtime, job_id: int, tenant_id: str, product_id: int, product_version: int,
           stored: list[StoredImage]) -> tuple[list[int], set[int], list[_Seen]]:
    """Store and link the images, classify each one, and find near candidates (one transaction).
    Returns the image ids by position, those this transaction created, and what it learned.

    A row this transaction created is linked to nothing else and named by no listing (its id did
    not exist before; a concurrent insert of the same bytes waits on it and then finds it), so
    neither is looked up for it. A redelivery after this commit finds the row stored and looks."""
    with job_session(runtime.session_factory, job_id) as session:
        image_ids: list[int] = []
        created: set[int] = set()
        for position, img in enumerate(stored):
            image_id, is_new = images.upsert(session, tenant_id, img.row)
            image_ids.append(image_id)
            if is_new:
                created.add(image_id)
            images.link_to_product(session, tenant_id=tenant_id, product_id=product_id,
                                   product_version=product_version, position=position, image_id=image_id,
                                   role=img.role, source_url=img.url)
        first: dict[int, StoredImage] = {}  # each distinct image once, in the order of its first position
        for image_id, img in zip(image_ids, stored):
            first.setdefault(image_id, img)
        brought = [i for i in first if i in created or not images.linked_elsewhere(
            session, tenant_id, i, product_id=product_id, product_version=product_version)]
        seen: list[_Seen] = []
        for image_id, img in first.items():
            if image_id not in brought:  # older version of this product (skip) or the same bytes elsewhere
                seen.append(_Seen(img, image_id, exact_of=images.product_using(session, tenant_id, image_id,
                                                                               exclude_product=product_id)))
                continue
            # Compared with what was stored before this version and with its own earlier images, not
            # its later ones: what the first attempt saw, and what a redelivery sees again.
            later = tuple(brought[brought.index(image_id) + 1:])
            img.decoded(runtime)  # bytes stored before but linked nowhere else (an earlier attempt's): search them
            row = img.row
            found = images.near_candidates(
                session, tenant_id, image_id, phash=row.phash, dhash=row.dhash, k=CANDIDATE_K,
                max_hamming=CANDIDATE_MAX_HAMMING, exclude=later, mirrored=img.mirrored,
                trimmed=(row.phash_trimmed or row.phash, row.dhash_trimmed or row.dhash),
                centre=(row.phash_centre or row.phash, row.dhash_centre or row.dhash))
            apart = decisions.decided_apart(session, tenant_id, row.sha256)  # merchant said: never these
            seen.append(_Seen(img, image_id, near_check=True,
                              candidates=tuple(c for c in found if c.sha256 not in apart)))
    return image_ids, created, seen


def _verify_near(runtime: Runtime, tenant_id: str, seen: _Seen) -> list[DuplicateMatch]:
    """The geometrically confirmed candidates, most inliers first; runs with no transaction open.
    The new image's features are persisted for when it is someone else's candidate."""
    verifier = runtime.dedup_verifier
    query = dedup_features.remember(runtime, tenant_id, seen.image_id, seen.img.row.sha256,
                                    verifier.features(seen.img.decoded(runtime)))
    matches = [verifier.match_features(query, dedup_features.load(runtime, tenant_id, c.image_id, c.sha256,
                                                                  c.storage_uri),
                                       image_id=c.image_id, hamming=c.hamming) for c in seen.candidates]
    return sorted((m for m in matches if m.confirmed), key=lambda m: (-m.inliers, m.hamming, m.image_id))


def _still_ours(job: EnrichmentJob | None, task_id: str) -> bool:
    return (job is not None and job.status not in jobs.FINAL and job.stage == Stage.fetch.value
            and Claims.of(job.work).holder(Stage.fetch.value) == task_id)


def _reusable(session: Session, tenant_id: str, image_id: int, key: str | None) -> int | None:
    """A listing of this image, from the same inputs (``tasks.pipeline.reuse``), by the versions the
    registry serves now (the CPU worker needs no model identity of its own): reuse it, no model
    work. None until every kind has an active version."""
    active = {kind: row.id for kind, row in model_versions.active(session).items()}
    if key is None or set(active) != {"detector", "vlm", "clip"}:
        return None
    return listings.reusable(session, tenant_id, image_id, active, reuse_key=key)


def fetch_and_dedup(runtime: Runtime, job_id: int, task_id: str) -> FetchOutcome:
    started = time.perf_counter()
    with job_session(runtime.session_factory, job_id) as session:
        job = jobs.claim(session, job_id, Stage.fetch, task_id, runtime.retry.max_stage_attempts)
        if job is None:
            return FetchOutcome(None)
        tenant_id, product_id, version = job.tenant_id, job.product_id, job.product_version
        request = EnrichRequest.of(job.work)
        product = products.get(session, product_id)
        assert product is not None
        merchant_id, external_id = product.merchant_id, product.external_id
        key = reuse_key(category=product.category, title=product.title, description=product.description,
                        attributes=dict(product.attributes), locale=product.locale,
                        unknown_category=runtime.unknown_category)
        # Reuse copies a generated listing: only a product whose policy generates one may take it
        # (the others get their own policy's record from the model stage, however alike the inputs).
        if not generates_listing(runtime.enrichment.resolve(tenant_id, product.category, request.stages_hint)):
            key = None
    faults.hit("fetch.claimed", external_id=external_id, job_id=job_id)

    stored = _describe_all(runtime, job_id, tenant_id, _fetch_all(runtime, request, tenant_id, merchant_id))
    fetched_ms = (time.perf_counter() - started) * 1000
    image_ids, created, seen = _store(runtime, job_id, tenant_id, product_id, version, stored)
    near = {s.image_id: _verify_near(runtime, tenant_id, s) for s in seen if s.near_check}

    with job_session(runtime.session_factory, job_id) as session:
        job = job_rows.lock(session, job_id)
        if not _still_ours(job, task_id):
            return FetchOutcome(None)  # ended, or handed off or re-claimed by another task meanwhile
        assert job is not None
        images.lock_groups(session, tenant_id)  # merchant decisions edit the groups too
        duplicates: list[DuplicateFound] = []
        for s in seen:
            # Decisions are read here, under the lock: one that arrived while verifying still counts.
            match = (decisions.allowed_match(session, tenant_id, s.img.row.sha256, near[s.image_id])
                     if s.near_check else None)
            if s.exact_of is not None:
                images.record_exact_duplicate(session, tenant_id, s.image_id)
                duplicates.append(DuplicateFound(s.img.url, "exact", s.exact_of, 0, None))
            elif match is not None:
                images.record_near_duplicate(session, tenant_id, s.image_id, match.image_id, match.hamming,
                                             match.inliers)
                other = images.product_using(session, tenant_id, match.image_id, exclude_product=product_id)
                duplicates.append(DuplicateFound(s.img.url, "near", other, match.hamming, match.inliers))
            if s.near_check:
                decisions.honour_confirmed(session, tenant_id, s.image_id, s.img.row.sha256)
        primary = next((i for i, s in enumerate(stored) if s.role == "primary"), 0)
        # Every photo the model stage reads decides the listing too: a listing of the same primary photo
        # with other secondary photos is not a re-listing.
        key = with_photos(key, [s.row.sha256 for i, s in enumerate(stored) if i != primary])
        # A primary photo first stored by this attempt has no listing yet to reuse (``_store``).
        reuse = None if image_ids[primary] in created else _reusable(session, tenant_id, image_ids[primary], key)
        nxt = Stage.persist if reuse is not None else jobs.STAGES[Stage.fetch].next
        assert nxt is not None
        handoff = FetchedImages(image_ids=tuple(image_ids), primary_image_id=image_ids[primary],
                                primary_uri=stored[primary].row.storage_uri, duplicates=tuple(duplicates),
                                reuse_listing_id=reuse, reuse_key=key,
                                image_uris=tuple(s.row.storage_uri for s in stored))
        jobs.hand_off(session, job, nxt, handoff, timings={
            "fetch": fetched_ms, "dedup": (time.perf_counter() - started) * 1000 - fetched_ms})
    log.info("fetch.done", job_id=job_id, images=len(stored), duplicates=len(duplicates), reuse=reuse is not None)
    return FetchOutcome(nxt, duplicates)
