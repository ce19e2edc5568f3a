"""Backfill of the trimmed and centre hashes of images stored before migration 0009.

Candidate search compares a query four ways per hash kind (``models.hashing``); a row without its
trimmed and centre hashes is compared by its plain ones only, so a letterboxed original or a
re-coloured background around it is missed. This fills them from the stored original, in small
batches, as the maintenance role (``enrich_admin``) in the system scope:

* one short transaction reads the next batch of rows (keyset paging by id), the originals are read
  from blob storage and hashed with no transaction open, and one short transaction writes them;
* the write only fills what is still NULL, so a re-run (or a concurrent fetch) changes nothing,
  and an interrupted run resumes where the rows are still empty;
* an image whose original is gone from storage, or whose bytes no longer match its sha256 or no
  longer decode, is reported by id, tenant and URI and left as it is (its plain hashes still
  serve); a storage outage (``TransientError``) ends the run, to be started again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from sqlalchemy.orm import Session, sessionmaker

from db.engine import admin_session
from db.repositories import images
from models.errors import ImageRejected
from models.hashing import candidate_hashes, sha256_hex
from models.images import ImageLimits, decode_image
from tasks.errors import PipelineError, TransientError

log = structlog.get_logger(__name__)

ReadOriginal = Callable[[str], bytes]  # storage URI -> bytes (``BlobStore.get``)


@dataclass(frozen=True)
class Unfilled:
    """An image the backfill could not hash: ``reason`` is missing | mismatch | undecodable."""

    image_id: int
    tenant_id: str
    storage_uri: str
    reason: str
    detail: str


@dataclass
class HashBackfillReport:
    todo: int = 0  # rows lacking hashes when the run started
    filled: int = 0
    already: int = 0  # complete by the time the write came (a concurrent fetch or backfill)
    unfilled: list[Unfilled] = field(default_factory=list)
    batches: int = 0
    seconds: float = 0.0
    last_id: int = 0  # the keyset cursor: the highest id this run looked at

    @property
    def looked_at(self) -> int:
        return self.filled + self.already + len(self.unfilled)


def _hash_one(row: images.HashlessImage, read: ReadOriginal,
              limits: ImageLimits) -> tuple[tuple[str, str], tuple[str, str]] | Unfilled:
    """(trimmed, centre) (pHash, dHash) of the stored original, or why there are none."""
    def unfilled(reason: str, detail: str) -> Unfilled:
        return Unfilled(row.image_id, row.tenant_id, row.storage_uri, reason, detail)

    try:
        data = read(row.storage_uri)
    except TransientError:
        raise
    except PipelineError as exc:
        return unfilled("missing", exc.detail)
    if sha256_hex(data) != row.sha256:
        return unfilled("mismatch", "stored bytes do not match the image's sha256")
    try:
        decoded = decode_image(data, limits)
    except ImageRejected as exc:
        return unfilled("undecodable", str(exc))
    h = candidate_hashes(decoded.image)
    return (h.trimmed.phash, h.trimmed.dhash), (h.centre.phash, h.centre.dhash)


def count_todo(factory: sessionmaker[Session]) -> int:
    with admin_session(factory) as s:
        return images.count_hashless(s)


def backfill_image_hashes(factory: sessionmaker[Session], read: ReadOriginal, limits: ImageLimits, *,
                          batch_size: int = 100, limit: int | None = None,
                          on_batch: Callable[[HashBackfillReport], None] | None = None) -> HashBackfillReport:
    """Fill the missing hashes of every tenant's images, ``batch_size`` rows per transaction, at most
    ``limit`` rows looked at (None: all); ``on_batch`` sees the report after each batch."""
    if batch_size < 1:
        raise ValueError("batch_size must be positive")
    started = time.perf_counter()
    report = HashBackfillReport(todo=count_todo(factory))
    while limit is None or report.looked_at < limit:
        take = batch_size if limit is None else min(batch_size, limit - report.looked_at)
        with admin_session(factory) as s:
            batch = images.hashless_batch(s, after_id=report.last_id, limit=take)
        if not batch:
            break
        hashed = [(row, _hash_one(row, read, limits)) for row in batch]  # no transaction open
        with admin_session(factory) as s:
            for row, result in hashed:
                if isinstance(result, Unfilled):
                    report.unfilled.append(result)
                    log.warning("images.hashes_unfilled", image_id=row.image_id, tenant_id=row.tenant_id,
                                reason=result.reason)
                elif images.fill_hashes(s, row.tenant_id, row.image_id, trimmed=result[0], centre=result[1]):
                    report.filled += 1
                else:
                    report.already += 1
        report.batches += 1
        report.last_id = batch[-1].image_id
        if on_batch is not None:
            on_batch(report)
    report.seconds = time.perf_counter() - started
    log.info("images.hashes_backfilled", filled=report.filled, unfilled=len(report.unfilled),
             batches=report.batches, seconds=round(report.seconds, 2))
    return report
