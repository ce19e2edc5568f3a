"""The fetch stage's dedup: exact copies in the duplicate groups, verification with no transaction
open, and redeliveries that converge.

``fetch_and_dedup`` runs as a fetch task runs it: as ``enrich_worker`` under forced row-level
security, each ``job_session`` scoped to the job's tenant. Most tests run on the test's rolled-back
connection (each stage transaction a savepoint); the one that looks for open transactions from
outside needs real commits and real connections, so it gets a database of its own.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from db.engine import job_session, make_engine
from db.enums import Stage
from db.tables import EnrichmentJob, InboxEvent, Merchant, OutboxMessage, Product, Tenant
from models.dedup import NearDuplicateVerifier
from models.images import ImageLimits
from tasks.io.blobs import LocalBlobStore
from tasks.io.fetcher import FetchedImage
from tasks.pipeline import jobs
from tasks.pipeline.fetch import fetch_and_dedup
from tasks.pipeline.work import EnrichRequest, FetchedImages, ImageRef
from tasks.runtime import Runtime
from tests.conftest import READER_ROLE, WORKER_ROLE, as_role, fresh_database, in_tenant

TENANT = "acme"


class PhotoFetcher:
    """Serves fixed bytes per URL: what the SSRF-safe fetcher would have downloaded."""

    def __init__(self) -> None:
        self.photos: dict[str, bytes] = {}

    def fetch(self, url: str, *, tenant_id: str, merchant_id: str) -> FetchedImage:
        return FetchedImage(self.photos[url], "image/jpeg", url)


class WatchedVerifier:
    """The real verifier; ``before_match`` runs before every candidate is matched."""

    def __init__(self, before_match: Callable[[int], None]) -> None:
        self._inner = NearDuplicateVerifier()
        self._before_match = before_match
        self.matched: list[int] = []

    def features(self, img: Image.Image) -> Any:
        return self._inner.features(img)

    def match_features(self, query: Any, other: Any, *, image_id: int, hamming: int) -> Any:
        self._before_match(image_id)
        self.matched.append(image_id)
        return self._inner.match_features(query, other, image_id=image_id, hamming=hamming)


def _runtime(factory: sessionmaker[Session], blobs: Path, fetcher: PhotoFetcher) -> Runtime:
    return Runtime(session_factory=factory, blobs=LocalBlobStore(blobs),
                   fetcher=fetcher, publisher=None,  # type: ignore[arg-type]
                   image_limits=ImageLimits(), models_factory=None)  # type: ignore[arg-type]


def _jpeg(img: Image.Image, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos(sample_photos: list[tuple[Path, str]]) -> dict[str, bytes]:
    """A photo, a re-encoded 70 % copy of it (a near duplicate), and an unrelated photo."""
    original = Image.open(sample_photos[0][0]).convert("RGB")
    smaller = original.resize((original.width * 7 // 10, original.height * 7 // 10), Image.Resampling.LANCZOS)
    return {"photo": sample_photos[0][0].read_bytes(), "reupload": _jpeg(smaller, 80),
            "other": sample_photos[5][0].read_bytes()}


def _seed_tenant(session: Session, tenant: str) -> None:
    session.add(Tenant(id=tenant))
    session.flush()
    session.add(Merchant(tenant_id=tenant, id="m"))
    session.flush()


def _seed_job(session: Session, tenant: str, external_id: str, urls: list[str]) -> int:
    product = Product(tenant_id=tenant, merchant_id="m", external_id=external_id, version=1, category="dress")
    event = InboxEvent(event_id=uuid.uuid4(), tenant_id=tenant, event_type="product.created",
                       status="accepted")
    session.add_all([product, event])
    session.flush()
    request = EnrichRequest(tuple(ImageRef(url, "primary" if i == 0 else "gallery")
                                  for i, url in enumerate(urls)))
    job = EnrichmentJob(tenant_id=tenant, event_id=event.event_id, product_id=product.id, product_version=1,
                        status="pending", work=request.to_work())
    session.add(job)
    session.flush()
    return job.id


def _groups(session: Session, tenant: str = TENANT) -> list[tuple[str, list[tuple[str, str, list[str]]]]]:
    """The view as an analyst reads it: (representative sha256, [(method, sha256, products)])."""
    with in_tenant(session, tenant, READER_ROLE):
        rows = session.execute(text("SELECT representative_sha256, members FROM catalog.duplicate_groups "
                                    "WHERE tenant_id = :t ORDER BY group_id"), {"t": tenant}).all()
    return [(r.representative_sha256, [(m["method"], m["sha256"], m["products"]) for m in r.members])
            for r in rows]


def _sha(data: bytes) -> str:
    from models.hashing import sha256_hex

    return sha256_hex(data)


# ---------------------------------------------------------------- on the test's connection


@pytest.fixture
def stage(db_session: Session, tmp_path: Path,
          photos: dict[str, bytes]) -> Iterator[tuple[Runtime, PhotoFetcher]]:
    """A fetch worker's runtime whose sessions are savepoints of the test's transaction, as
    ``enrich_worker``; the tenant and merchant are seeded."""
    _seed_tenant(db_session, TENANT)
    fetcher = PhotoFetcher()
    fetcher.photos = {_url(name): data for name, data in photos.items()}
    factory = sessionmaker(bind=db_session.connection(), join_transaction_mode="create_savepoint",
                           expire_on_commit=False)
    with as_role(db_session, WORKER_ROLE):
        yield _runtime(factory, tmp_path / "blobs", fetcher), fetcher


def _url(name: str) -> str:
    return f"https://cdn.example.com/{name}.jpg"


def _run(db_session: Session, runtime: Runtime, external_id: str, names: list[str],
         task_id: str = "t-1") -> int:
    with as_role(db_session, None):
        job_id = _seed_job(db_session, TENANT, external_id, [_url(n) for n in names])
    fetch_and_dedup(runtime, job_id, task_id)
    return job_id


def _handoff(db_session: Session, job_id: int) -> FetchedImages:
    with as_role(db_session, None):
        db_session.expire_all()
        return FetchedImages.of(db_session.get(EnrichmentJob, job_id).work)


def test_an_exact_copy_in_another_product_is_a_duplicate_group(db_session: Session, stage,  # noqa: ANN001
                                                                photos: dict[str, bytes]) -> None:
    runtime, _ = stage
    _run(db_session, runtime, "orig", ["photo"])
    assert _groups(db_session) == []  # one product: nothing duplicated yet
    copy_job = _run(db_session, runtime, "copy", ["photo"])
    handoff = _handoff(db_session, copy_job)
    assert [(d.kind, d.duplicate_of_product) for d in handoff.duplicates] == [("exact", "orig")]
    sha = _sha(photos["photo"])
    assert _groups(db_session) == [(sha, [("exact", sha, ["copy", "orig"])])]

    fetch_and_dedup(runtime, copy_job, "t-1")  # a late redelivery: the stage has passed, nothing changes
    third = _run(db_session, runtime, "third", ["photo"])  # a third product joins the same group
    assert [d.kind for d in _handoff(db_session, third).duplicates] == ["exact"]
    assert _groups(db_session) == [(sha, [("exact", sha, ["copy", "orig", "third"])])]


def test_bytes_the_tenant_already_stored_are_not_decoded_or_hashed_again(db_session: Session, stage,  # noqa: ANN001
                                                                      photos: dict[str, bytes],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A product update that keeps its photo, and another product re-using it, take the stored row: no
    decode, no hashing, no second put of the original; the same row, groups and hand-off as before."""
    import tasks.pipeline.fetch as fetch_module

    runtime, _ = stage
    decoded: list[int] = []
    real = fetch_module.decode_image
    monkeypatch.setattr(fetch_module, "decode_image", lambda data, limits: decoded.append(len(data)) or real(data, limits))
    first = _run(db_session, runtime, "orig", ["photo", "other", "photo"])  # the same bytes twice: decoded once
    assert len(decoded) == 2
    before = _handoff(db_session, first)
    decoded.clear()
    copy = _run(db_session, runtime, "copy", ["photo"])
    assert decoded == []
    after = _handoff(db_session, copy)
    assert after.primary_image_id == before.primary_image_id and after.primary_uri == before.primary_uri
    assert [(d.kind, d.duplicate_of_product) for d in after.duplicates] == [("exact", "orig")]
    sha = _sha(photos["photo"])
    assert _groups(db_session) == [(sha, [("exact", sha, ["copy", "orig"])])]
    # a new photo beside the known one: only the new bytes are decoded, and they are still searched
    near = _run(db_session, runtime, "mixed", ["photo", "reupload"])
    assert decoded == [len(photos["reupload"])]
    assert [d.kind for d in _handoff(db_session, near).duplicates] == ["exact", "near"]


def test_a_near_copy_joins_the_exact_group_of_its_original(db_session: Session, stage,  # noqa: ANN001
                                                            photos: dict[str, bytes]) -> None:
    runtime, _ = stage
    _run(db_session, runtime, "orig", ["photo"])
    _run(db_session, runtime, "copy", ["photo"])
    near_job = _run(db_session, runtime, "reupload", ["reupload"])
    (found,) = _handoff(db_session, near_job).duplicates
    assert found.kind == "near" and found.duplicate_of_product in ("orig", "copy") and found.inliers
    sha = _sha(photos["photo"])
    assert _groups(db_session) == [(sha, [("exact", sha, ["copy", "orig"]),
                                          ("near", _sha(photos["reupload"]), ["reupload"])])]


def test_photos_this_attempt_stored_first_skip_the_link_and_reuse_lookups(  # noqa: ANN001
        db_session: Session, stage, photos: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """A row the store transaction created is linked nowhere else and no listing names it: its fetch
    reads neither (two fewer statements per new photo, and one fewer for having no verified match).
    Bytes stored before, by another product or by this job's own earlier attempt, are looked up as
    ever, and the hand-offs are the ones the lookups would give."""
    import tasks.pipeline.fetch as fetch_module
    from db.repositories import images as image_rows

    runtime, _ = stage
    looked: dict[str, int] = {"links": 0, "reuse": 0}
    links, reuse = image_rows.linked_elsewhere, fetch_module._reusable

    def counting_links(*a, **k):  # noqa: ANN002, ANN003, ANN202
        looked["links"] += 1
        return links(*a, **k)

    def counting_reuse(*a, **k):  # noqa: ANN002, ANN003, ANN202
        looked["reuse"] += 1
        return reuse(*a, **k)

    monkeypatch.setattr(image_rows, "linked_elsewhere", counting_links)
    monkeypatch.setattr(fetch_module, "_reusable", counting_reuse)
    first = _run(db_session, runtime, "orig", ["photo", "other"])
    assert looked == {"links": 0, "reuse": 0}
    assert _handoff(db_session, first).reuse_listing_id is None and _outbox(db_session, first) == [
        ("task:catalog.model", [first])]
    copy = _run(db_session, runtime, "copy", ["photo"])  # stored before: both lookups run
    assert looked == {"links": 1, "reuse": 1}
    assert [(d.kind, d.duplicate_of_product) for d in _handoff(db_session, copy).duplicates] == [("exact", "orig")]


def _outbox(db_session: Session, job_id: int) -> list[tuple[str, list[int]]]:
    with as_role(db_session, None):
        rows = db_session.query(OutboxMessage).filter_by(tenant_id=TENANT).order_by(OutboxMessage.id).all()
    return [(r.routing_key, r.payload["args"]) for r in rows if r.payload.get("args") == [job_id]]


def test_a_redelivery_after_a_crash_in_verification_converges(db_session: Session, stage,  # noqa: ANN001
                                                               photos: dict[str, bytes]) -> None:
    """The first attempt stores and links the images, then dies while verifying; the redelivery
    (same task id) finds them stored by itself, still checks them for near duplicates, and ends
    with the hand-off and groups one clean run gives. A later redelivery changes nothing."""
    runtime, _ = stage
    _run(db_session, runtime, "orig", ["photo"])

    def crash(image_id: int) -> None:
        raise RuntimeError("worker killed during verification")

    clean = runtime.dedup_verifier
    runtime._verifier = WatchedVerifier(crash)  # type: ignore[assignment]
    with as_role(db_session, None):
        job_id = _seed_job(db_session, TENANT, "reupload", [_url("reupload"), _url("other")])
    with pytest.raises(RuntimeError):
        fetch_and_dedup(runtime, job_id, "t-1")
    assert _groups(db_session) == [] and _outbox(db_session, job_id) == []
    with as_role(db_session, None):  # stored and linked by a transaction that committed before verifying
        linked = db_session.execute(text("SELECT count(*) FROM product_images pi JOIN enrichment_jobs j"
                                         " ON j.product_id = pi.product_id WHERE j.id = :j"), {"j": job_id})
        assert linked.scalar_one() == 2

    runtime._verifier = clean
    assert fetch_and_dedup(runtime, job_id, "t-1").next_stage is not None
    handoff = _handoff(db_session, job_id)
    sha = _sha(photos["photo"])
    assert [(d.image_url, d.kind, d.duplicate_of_product) for d in handoff.duplicates] == [
        (_url("reupload"), "near", "orig")]
    groups = _groups(db_session)
    assert groups == [(sha, [("near", sha, ["orig"]), ("near", _sha(photos["reupload"]), ["reupload"])])]
    assert _outbox(db_session, job_id) == [("task:catalog.model", [job_id])]

    assert fetch_and_dedup(runtime, job_id, "t-1").next_stage is None
    assert _handoff(db_session, job_id) == handoff and _groups(db_session) == groups
    assert _outbox(db_session, job_id) == [("task:catalog.model", [job_id])]


def test_the_hand_off_backs_off_when_another_task_took_the_stage_during_verification(
        db_session: Session, stage) -> None:  # noqa: ANN001
    """The final transaction re-locks the job and checks the fetch stage is still this task's: the
    reconciler released a claim it thought stalled and a new task claimed it meanwhile."""
    runtime, _ = stage
    _run(db_session, runtime, "orig", ["photo"])
    with as_role(db_session, None):
        job_id = _seed_job(db_session, TENANT, "reupload", [_url("reupload")])

    def taken_over(image_id: int) -> None:
        with job_session(runtime.session_factory, job_id) as session:
            assert jobs.release_claim(session, job_id, "fetch")
            assert jobs.claim(session, job_id, Stage.fetch, "t-2") is not None

    runtime._verifier = WatchedVerifier(taken_over)  # type: ignore[assignment]
    assert fetch_and_dedup(runtime, job_id, "t-1").next_stage is None
    assert _groups(db_session) == [] and _outbox(db_session, job_id) == []

    runtime._verifier = None
    assert fetch_and_dedup(runtime, job_id, "t-2").next_stage is not None
    assert [d.kind for d in _handoff(db_session, job_id).duplicates] == ["near"]
    assert _outbox(db_session, job_id) == [("task:catalog.model", [job_id])]


# ---------------------------------------------------------------- real commits, real connections


@pytest.fixture(scope="module")
def committed_db(pg_url: str) -> Iterator[tuple[Engine, Engine]]:
    """(superuser engine, ``enrich_worker`` engine) on a database of this module's own."""
    url = fresh_database(pg_url, "suite_fetch_dedup")
    owner, worker = make_engine(url, pool_size=2), make_engine(url, pool_size=2, runtime_role=WORKER_ROLE)
    yield owner, worker
    owner.dispose()
    worker.dispose()


def test_no_transaction_is_open_while_candidates_are_read_and_verified(  # noqa: ANN001
        committed_db, tmp_path: Path, photos: dict[str, bytes]) -> None:
    """Seen from another connection at every blob read and every verification of the near-copy
    job: no backend of the database is idle in a transaction, and the job row can be locked at once
    (``FOR UPDATE NOWAIT``), i.e. no stage transaction holds it."""
    owner, worker = committed_db
    tenant = f"acme-{uuid.uuid4().hex[:8]}"
    with Session(owner) as s, s.begin():
        _seed_tenant(s, tenant)
        orig = _seed_job(s, tenant, "orig", [_url("photo")])
        near = _seed_job(s, tenant, "reupload", [_url("reupload")])
    fetcher = PhotoFetcher()
    fetcher.photos = {_url(name): data for name, data in photos.items()}
    factory = sessionmaker(bind=worker, expire_on_commit=False)
    first = _runtime(factory, tmp_path / "blobs", fetcher)
    assert fetch_and_dedup(first, orig, "t-orig").next_stage is not None

    seen: list[tuple[str, list[str], bool]] = []

    def look(where: str) -> None:
        with owner.connect() as conn:
            idle = conn.execute(text(
                "SELECT state FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND state LIKE 'idle in transaction%'")).scalars().all()
            try:
                conn.execute(text("SELECT id FROM enrichment_jobs WHERE id = :id FOR UPDATE NOWAIT"),
                             {"id": near})
                lockable = True
            except OperationalError as exc:
                if "could not obtain lock" not in str(exc):
                    raise
                lockable = False
            conn.rollback()
        seen.append((where, idle, lockable))

    runtime = _runtime(factory, tmp_path / "blobs", fetcher)  # a fresh process: no cached features
    blobs_get = runtime.blobs.get

    def watched_get(uri: str) -> bytes:
        look("blob read")
        return blobs_get(uri)

    runtime.blobs.get = watched_get  # type: ignore[method-assign]
    verifier = WatchedVerifier(lambda image_id: look("verify"))
    runtime._verifier = verifier  # type: ignore[assignment]
    outcome = fetch_and_dedup(runtime, near, "t-near")

    assert [d.kind for d in outcome.duplicates] == ["near"] and verifier.matched
    assert {where for where, _, _ in seen} == {"blob read", "verify"}
    assert all(idle == [] and lockable for _, idle, lockable in seen), seen


def test_features_are_persisted_at_ingest_and_read_back_instead_of_the_original(  # noqa: ANN001
        db_session: Session, stage, photos: dict[str, bytes], tmp_path: Path) -> None:
    """The first product's image gets its features written beside its original; a fresh process
    (empty cache) verifies the re-upload against them without reading the original at all. An
    image stored before features were persisted (its features blob gone) is extracted from its
    original once, and its features are written then."""
    from tasks.pipeline.dedup_features import features_key

    runtime, fetcher = stage
    _run(db_session, runtime, "orig", ["photo"])
    key = features_key(TENANT, _sha(photos["photo"]))
    assert runtime.blobs.exists(key)

    fresh = _runtime(runtime.session_factory, tmp_path / "blobs", fetcher)
    reads: list[str] = []
    get = fresh.blobs.get
    fresh.blobs.get = lambda uri: reads.append(uri) or get(uri)  # type: ignore[method-assign]
    job = _run(db_session, fresh, "reupload", ["reupload"])
    found = _handoff(db_session, job).duplicates
    assert [(d.kind, d.duplicate_of_product) for d in found] == [("near", "orig")]
    assert reads == [fresh.blobs.uri_for(key)]  # the features, never the original

    (tmp_path / "blobs" / key).unlink()  # as for an image stored before this
    older = _runtime(runtime.session_factory, tmp_path / "blobs", fetcher)
    fetcher.photos[_url("again")] = _jpeg(Image.open(io.BytesIO(photos["photo"])).convert("RGB"), 70)
    job = _run(db_session, older, "again", ["again"])
    assert [d.kind for d in _handoff(db_session, job).duplicates] == ["near"]
    assert runtime.blobs.exists(key)  # extracted from the original and persisted again
