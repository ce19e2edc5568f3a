"""Versions never mix: a job whose product moved to a newer version stops at its next stage claim
as ``superseded`` (final, no retry, nothing published) and the newer version's job runs on the
newer text.

The real stage functions run as production runs them: intake in the tenant's transaction and
each stage in ``job_session``, all as ``enrich_worker`` under forced row-level security, on the
test's connection (each transaction a savepoint, everything rolled back). The image fetcher and
the GPU batcher are stand-ins; decoding, hashing, dedup, blob storage, the outbox and every SQL
statement are real.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from db.engine import job_session, tenant_session
from db.tables import EnrichmentJob, Listing, OutboxMessage
from models.batch import ModelItem, ModelResult
from models.images import ImageLimits
from tasks.errors import ErrorCode
from tasks.events import parse_product_event, product_event_payload
from tasks.io.blobs import LocalBlobStore
from tasks.pipeline import jobs
from tasks.pipeline.fetch import fetch_and_dedup
from tasks.pipeline.intake import Outcome, accept_product_event
from tasks.pipeline.model import model_stage
from tasks.pipeline.persist import persist
from tasks.runtime import Runtime
from tests.conftest import WORKER_ROLE, as_role
from tests.db.catalog_rows import add_model_version, add_tenant
from tests.tasks.pipeline.rows import commit_job_at

TENANT = "acme"
V1_URL, V2_URL = "https://img.example/v1.jpg", "https://img.example/v2.jpg"


@dataclass
class FakeFetcher:
    photos: dict[str, bytes]
    fetched: list[str] = field(default_factory=list)

    def fetch(self, url: str, *, tenant_id: str, merchant_id: str) -> Any:
        self.fetched.append(url)
        return SimpleNamespace(data=self.photos[url], content_type="image/jpeg", final_url=url)


@dataclass
class FakeBatcher:
    """The GPU worker's micro-batcher: one result per item, stamped with the registry's ids."""

    model_ids: dict[str, int]
    items: list[ModelItem] = field(default_factory=list)
    during: Any = None  # called while the "model" runs, after the stage's claim committed

    def run(self, item: ModelItem, timeout: float | None = None) -> ModelResult:
        self.items.append(item)
        if self.during is not None:
            self.during()
        return ModelResult(
            job_id=item.job_id, schema_id=f"{item.category}@1",
            grounding={"prompt": item.category, "box": [0.0, 0.0, 8.0, 8.0], "score": 0.9, "fallback": False},
            content={"title": item.title, "description": item.description, "attributes": {}},
            model_output={"title": item.title}, model_input={"schema_id": f"{item.category}@1"},
            image_embedding=[1.0] + [0.0] * 7, text_embedding=[0.0, 1.0] + [0.0] * 6, text_input=item.title,
            timings_ms={"model": 1.0}, model_versions=dict(self.model_ids), random_weights=True)


@pytest.fixture
def pipeline(db_session: Session, tmp_path: Path, sample_photos: list[tuple[Path, str]]) -> Iterator[SimpleNamespace]:
    model_ids = {kind: add_model_version(db_session, kind, f"{kind}-superseded", dims=8 if kind == "clip" else None)
                 for kind in ("detector", "vlm", "clip")}
    add_tenant(db_session, TENANT)
    photos = {V1_URL: sample_photos[0][0].read_bytes(), V2_URL: sample_photos[2][0].read_bytes()}
    factory: sessionmaker[Session] = sessionmaker(bind=db_session.connection(), join_transaction_mode="create_savepoint",
                                                  expire_on_commit=False)
    runtime = Runtime(session_factory=factory, blobs=LocalBlobStore(tmp_path / "blobs"),  # type: ignore[arg-type]
                      fetcher=FakeFetcher(photos), publisher=None, image_limits=ImageLimits(),  # type: ignore[arg-type]
                      models_factory=None, heartbeat_s=0)  # type: ignore[arg-type]
    runtime._batcher = FakeBatcher(model_ids)  # type: ignore[assignment]
    with as_role(db_session, WORKER_ROLE):
        yield SimpleNamespace(runtime=runtime, factory=factory, session=db_session, fetcher=runtime.fetcher,
                              batcher=runtime._batcher)


def _publish(env: SimpleNamespace, version: int) -> tuple[int, str]:
    """Intake of one product event: (job id, event id)."""
    payload = product_event_payload(
        event_type="product.created" if version == 1 else "product.updated", tenant_id=TENANT, merchant_id="m1",
        external_id="sku-1", version=version, category="dress" if version == 1 else "skirt",
        image_urls=[V1_URL if version == 1 else V2_URL], title=f"Version {version} title",
        description=f"Version {version} description", attributes={"material": f"v{version}"})
    event = parse_product_event(json.dumps(payload).encode(), "application/json", payload["event_type"])
    with tenant_session(env.factory, TENANT) as session:
        result = accept_product_event(session, event)
    assert result.outcome is Outcome.accepted and result.job_id is not None
    return result.job_id, payload["event_id"]


def _job(env: SimpleNamespace, job_id: int) -> EnrichmentJob:
    with job_session(env.factory, job_id) as session:
        job = session.get(EnrichmentJob, job_id)
        assert job is not None
        session.expunge(job)
        return job


def _outbox(env: SimpleNamespace) -> list[tuple[str, Any]]:
    """(routing key, job id of a hand-off or causation id of an event), in order."""
    with tenant_session(env.factory, TENANT) as session:
        rows = session.query(OutboxMessage).filter_by(tenant_id=TENANT).order_by(OutboxMessage.id).all()
        return [(r.routing_key, r.payload["args"][0] if r.routing_key.startswith("task:") else r.payload["causation_id"])
                for r in rows]


def _events(env: SimpleNamespace) -> list[tuple[str, Any]]:
    return [row for row in _outbox(env) if row[0].startswith("listing.")]


def _listings(env: SimpleNamespace) -> list[tuple[int, str, str]]:
    with tenant_session(env.factory, TENANT) as session:
        return [(r.product_version, r.category, r.content["title"])
                for r in session.query(Listing).filter_by(tenant_id=TENANT).order_by(Listing.id)]


def _run_to_the_end(env: SimpleNamespace, job_id: int) -> int:
    assert fetch_and_dedup(env.runtime, job_id, f"fetch-{job_id}").next_stage is not None
    assert model_stage(env.runtime, job_id, f"model-{job_id}") is True
    listing_id = persist(env.runtime, job_id, f"persist-{job_id}")
    assert listing_id is not None
    return listing_id


def _assert_redeliveries_are_no_ops(env: SimpleNamespace, job_id: int) -> None:
    before, outbox = _job(env, job_id), _outbox(env)
    assert fetch_and_dedup(env.runtime, job_id, f"fetch-{job_id}").next_stage is None
    assert model_stage(env.runtime, job_id, f"model-{job_id}") is False
    assert persist(env.runtime, job_id, f"persist-{job_id}") is None
    with job_session(env.factory, job_id) as session:  # a late failure of the stage's task publishes nothing
        assert jobs.fail(session, job_id, ErrorCode.model_error, "late", retryable=True) is False
    after = _job(env, job_id)
    assert (after.status, after.stage, after.attempts, after.updated_at, after.error_code) == (
        before.status, before.stage, before.attempts, before.updated_at, None)
    assert _outbox(env) == outbox


def test_a_job_whose_product_moved_on_before_its_model_stage_ends_superseded(pipeline: SimpleNamespace) -> None:
    env = pipeline
    old_job, old_event = _publish(env, 1)
    assert fetch_and_dedup(env.runtime, old_job, "fetch-old").next_stage is not None  # handed to model
    new_job, new_event = _publish(env, 2)  # the product row now says version 2, skirt

    assert model_stage(env.runtime, old_job, "model-old") is False
    old = _job(env, old_job)
    assert (old.status, old.stage, old.finished_at is not None, old.error_code) == ("superseded", "model", True, None)
    assert env.batcher.items == []  # no model work for a version nobody will see
    assert _outbox(env) == [("task:catalog.fetch", old_job), ("task:catalog.model", old_job),
                            ("task:catalog.fetch", new_job)]  # no persist hand-off, no listing.* event
    _assert_redeliveries_are_no_ops(env, old_job)

    _run_to_the_end(env, new_job)
    assert _job(env, new_job).status == "done"
    assert [(i.job_id, i.category, i.title, i.attributes) for i in env.batcher.items] == [
        (new_job, "skirt", "Version 2 title", {"material": "v2"})]
    assert _listings(env) == [(2, "skirt", "Version 2 title")]
    assert _events(env) == [("listing.enriched", new_event)]
    assert old_event not in {cause for _, cause in _events(env)}


def test_a_version_arriving_while_the_model_runs_stops_the_old_job_at_persist(pipeline: SimpleNamespace) -> None:
    """The old job's model result is not written as a listing of either version."""
    env = pipeline
    old_job, old_event = _publish(env, 1)
    assert fetch_and_dedup(env.runtime, old_job, "fetch-old").next_stage is not None
    arrived: list[tuple[int, str]] = []
    env.batcher.during = lambda: arrived.append(_publish(env, 2))
    assert model_stage(env.runtime, old_job, "model-old") is True  # it had claimed: the result is handed on
    env.batcher.during = None
    (new_job, new_event), = arrived

    assert persist(env.runtime, old_job, "persist-old") is None
    assert _job(env, old_job).status == "superseded" and _listings(env) == [] and _events(env) == []
    _assert_redeliveries_are_no_ops(env, old_job)

    _run_to_the_end(env, new_job)
    assert _listings(env) == [(2, "skirt", "Version 2 title")]
    assert _events(env) == [("listing.enriched", new_event)]


def test_a_version_arriving_before_the_fetch_stops_the_old_job_before_any_download(pipeline: SimpleNamespace) -> None:
    env = pipeline
    old_job, _ = _publish(env, 1)
    new_job, new_event = _publish(env, 2)
    assert fetch_and_dedup(env.runtime, old_job, "fetch-old").next_stage is None
    assert _job(env, old_job).status == "superseded" and env.fetcher.fetched == []
    _assert_redeliveries_are_no_ops(env, old_job)
    _run_to_the_end(env, new_job)
    assert env.fetcher.fetched == [V2_URL] and _events(env) == [("listing.enriched", new_event)]


def test_superseded_jobs_are_invisible_to_the_reconciler_and_counted_by_status(pipeline: SimpleNamespace) -> None:
    """Coverage reads the latest version's job only: the superseded one neither stalls nor
    fails it; ``enrich status`` counts it under its own status."""
    from db.repositories import reports
    from tasks.pipeline.reconcile import coverage_counts, find_incomplete_products, reconcile
    from tests.conftest import in_system_scope

    env = pipeline
    old_job, _ = _publish(env, 1)
    new_job, _ = _publish(env, 2)
    assert fetch_and_dedup(env.runtime, old_job, "fetch-old").next_stage is None
    with in_system_scope(env.session):
        assert [(i.product_version, i.job_id) for i in find_incomplete_products(env.session)] == []
        assert coverage_counts(env.session)["in_flight"] == 1  # version 2's job, queued
        assert reconcile(env.session) == []
        assert reports.jobs_by_status(env.session) == {"pending": 1, "superseded": 1}
    _run_to_the_end(env, new_job)
    with in_system_scope(env.session):
        assert coverage_counts(env.session)["complete"] == 1


def test_a_claimed_stage_holds_its_version_until_it_commits(engine, worker_engine) -> None:  # noqa: ANN001
    """Intake of a newer version waits for a stage transaction that claimed the older one (for
    persist: the transaction that writes its listing), so a stage never sees its version change
    under it and nothing of the older version commits after the newer one was accepted. Two
    connections as ``enrich_worker``, committed rows (seeded and removed as the superuser)."""
    import uuid

    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    from db.enums import Stage
    from db.repositories import products
    from db.tables import InboxEvent, Merchant, Product, Tenant

    tenant, job_id = commit_job_at(engine, "sup", "persist")
    factory = sessionmaker(worker_engine, expire_on_commit=False)
    try:
        with job_session(factory, job_id) as stage:
            assert jobs.claim(stage, job_id, Stage.persist, "task-p") is not None
            with tenant_session(factory, tenant) as intake:
                intake.execute(text("SET LOCAL lock_timeout = '300ms'"))
                with pytest.raises(OperationalError, match="lock timeout"):
                    products.lock_by_external_id(intake, tenant, "p")
        with tenant_session(factory, tenant) as intake:  # the stage committed: intake goes ahead
            assert products.lock_by_external_id(intake, tenant, "p") is not None
    finally:
        with engine.begin() as conn:
            for table in ("enrichment_jobs", "products", "inbox_events", "merchants", "tenants"):
                column = "id" if table == "tenants" else "tenant_id"
                conn.execute(text(f"DELETE FROM {table} WHERE {column} = :t"), {"t": tenant})
