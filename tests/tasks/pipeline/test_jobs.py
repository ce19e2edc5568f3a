"""Stage claims: how at-least-once delivery becomes one run per stage.

The jobs functions run as a stage runs them: as ``enrich_worker`` under forced row-level security,
in the transaction ``db.engine.job_session`` scopes to the job's tenant; rows are seeded as the
superuser test connection first.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from db.engine import job_session
from db.enums import Stage
from db.tables import EnrichmentJob, InboxEvent, Merchant, Product, Tenant
from tasks.pipeline import jobs
from tasks.errors import ErrorCode, PipelineError
from tasks.pipeline.work import FetchedImages
from tests.conftest import WORKER_ROLE, as_role, in_scope, in_tenant
from tests.tasks.pipeline.rows import commit_job_at


@pytest.fixture
def job_id(db_session) -> int:  # noqa: ANN001
    db_session.add(Tenant(id="t"))
    db_session.flush()
    db_session.add(Merchant(tenant_id="t", id="m"))
    db_session.flush()
    product = Product(tenant_id="t", merchant_id="m", external_id="p", version=1, category="dress")
    event = InboxEvent(event_id=uuid.uuid4(), tenant_id="t", event_type="product.created", status="accepted")
    db_session.add_all([product, event])
    db_session.flush()
    job = EnrichmentJob(tenant_id="t", event_id=event.event_id, product_id=product.id, product_version=1)
    db_session.add(job)
    db_session.flush()
    return job.id


def _stage_factory(db_session: Session) -> sessionmaker[Session]:
    """Sessions on the test's connection (its role and rolled-back transaction), each
    ``job_session`` transaction a savepoint."""
    return sessionmaker(bind=db_session.connection(), join_transaction_mode="create_savepoint",
                        expire_on_commit=False)


@pytest.fixture
def stage(db_session: Session, job_id: int) -> Iterator[Session]:
    """The session a stage of job ``job_id`` works in: ``enrich_worker``, the job's tenant set by
    ``job_session`` (its system-scope lookup of the tenant, then the tenant scope only)."""
    with as_role(db_session, WORKER_ROLE), job_session(_stage_factory(db_session), job_id) as session:
        assert session.execute(text("SELECT current_user, current_setting('enrich.scope', true)")).one() == (
            WORKER_ROLE, "")
        yield session


def test_redelivery_reclaims_and_a_concurrent_duplicate_backs_off(stage: Session, job_id: int) -> None:
    assert jobs.claim(stage, job_id, Stage.fetch, "task-a") is not None
    assert jobs.claim(stage, job_id, Stage.fetch, "task-a") is not None  # same task redelivered
    assert jobs.claim(stage, job_id, Stage.fetch, "task-b") is None  # another task id: backs off
    job = stage.get(EnrichmentJob, job_id)
    assert job.attempts == {"fetch": 2} and job.status == "running"


def test_a_stage_reaches_its_job_only_in_the_jobs_tenant(db_session: Session, job_id: int) -> None:
    """Forced row-level security: as ``enrich_worker`` without a tenant, or in another tenant, the
    job does not exist for any jobs function; ``job_session`` is what makes it visible."""
    with in_scope(db_session, WORKER_ROLE):
        assert jobs.claim(db_session, job_id, Stage.fetch, "no-tenant") is None
    with in_tenant(db_session, "someone-else"):
        assert jobs.claim(db_session, job_id, Stage.fetch, "other") is None
        assert jobs.heartbeat(db_session, job_id, Stage.fetch, "other") is False
        assert jobs.release_claim(db_session, job_id, "fetch") is False
        assert jobs.fail(db_session, job_id, ErrorCode.model_error, "wrong tenant", retryable=False) is False
    factory = _stage_factory(db_session)
    with in_scope(db_session, WORKER_ROLE):
        with job_session(factory, 10**12) as session:  # an unknown job leaves no tenant at all
            assert session.execute(text("SELECT count(*) FROM enrichment_jobs")).scalar_one() == 0
        with job_session(factory, job_id) as session:
            assert jobs.claim(session, job_id, Stage.fetch, "task-a") is not None


def test_stages_not_reached_or_already_passed_are_no_ops(stage: Session, job_id: int) -> None:
    assert jobs.claim(stage, job_id, Stage.persist, "early") is None  # not reached yet
    job = jobs.claim(stage, job_id, Stage.fetch, "f")
    jobs.hand_off(stage, job, Stage.model, FetchedImages(image_ids=(1,), primary_image_id=1,
                                                         primary_uri="file:///originals/x"))
    assert jobs.claim(stage, job_id, Stage.fetch, "late") is None  # already passed
    assert jobs.claim(stage, job_id, Stage.model, "m") is not None


def test_a_stage_that_keeps_dying_is_given_up_on_any_broker(stage: Session, job_id: int) -> None:
    for _ in range(3):
        assert jobs.claim(stage, job_id, Stage.fetch, "poison", max_attempts=3) is not None
    with pytest.raises(PipelineError) as info:
        jobs.claim(stage, job_id, Stage.fetch, "poison", max_attempts=3)
    assert info.value.code is ErrorCode.worker_lost and not info.value.retryable


def test_fail_ends_the_job_once_and_writes_listing_failed(stage: Session, job_id: int) -> None:
    from db.tables import OutboxMessage

    assert jobs.fail(stage, job_id, ErrorCode.image_rejected, "not an image", retryable=False) is True
    assert jobs.fail(stage, job_id, ErrorCode.model_error, "again", retryable=False) is False
    job = stage.get(EnrichmentJob, job_id)
    assert (job.status, job.error_code) == ("failed", "image_rejected")
    rows = stage.query(OutboxMessage).filter_by(tenant_id="t").all()
    assert [r.payload["code"] for r in rows] == ["image_rejected"]
    assert rows[0].payload["causation_id"] == str(job.event_id)
    assert jobs.claim(stage, job_id, Stage.fetch, "after") is None  # ended jobs claim nothing


def test_the_stage_table_is_the_pipeline_in_order() -> None:
    """Every claimable stage has one row, in the Stage enum's order; each default next stage comes later."""
    assert jobs.STAGE_ORDER == list(Stage)
    for stage, spec in jobs.STAGES.items():
        assert spec.stage is stage and spec.task_name == f"catalog.{stage.value}"
        assert spec.queue in ("cpu", "gpu")
        if spec.next is not None:
            assert jobs.STAGE_ORDER.index(spec.next) > jobs.STAGE_ORDER.index(stage)
    assert jobs.STAGES[Stage.model].queue == "gpu" and jobs.STAGES[jobs.STAGE_ORDER[-1]].next is None


def test_hand_off_moves_the_job_and_dispatches_the_next_stage_through_the_outbox(stage: Session, job_id: int) -> None:
    from db.tables import OutboxMessage

    job = jobs.claim(stage, job_id, Stage.fetch, "f")
    handoff = FetchedImages(image_ids=(7,), primary_image_id=7, primary_uri="file:///originals/x")
    jobs.hand_off(stage, job, Stage.model, handoff, timings={"fetch": 1.25})
    assert job.stage == "model" and FetchedImages.of(job.work) == handoff and job.timings_ms == {"fetch": 1.2}
    rows = stage.query(OutboxMessage).filter_by(tenant_id="t").all()
    assert [(r.routing_key, r.payload) for r in rows] == [
        ("task:catalog.model", {"task": "catalog.model", "args": [job_id], "queue": "gpu"})]


def test_release_claim_lets_a_new_task_take_a_stalled_stage(stage: Session, job_id: int) -> None:
    jobs.claim(stage, job_id, Stage.fetch, "dead-worker")
    assert jobs.claim(stage, job_id, Stage.fetch, "new") is None
    assert jobs.release_claim(stage, job_id, "fetch") is True
    assert jobs.claim(stage, job_id, Stage.fetch, "new") is not None


def _age(session, job_id: int, interval: str = "2 hours") -> None:  # noqa: ANN001
    from sqlalchemy import text

    session.execute(text("UPDATE enrichment_jobs SET updated_at = now() - CAST(:i AS interval) WHERE id = :id"),
                    {"i": interval, "id": job_id})


def _updated_at(session, job_id: int):  # noqa: ANN001, ANN202
    from sqlalchemy import text

    return session.execute(text("SELECT updated_at FROM enrichment_jobs WHERE id = :id"), {"id": job_id}).scalar_one()


def test_a_heartbeat_refreshes_only_the_claim_its_task_holds(stage: Session, job_id: int) -> None:
    job = jobs.claim(stage, job_id, Stage.fetch, "task-a")
    _age(stage, job_id)
    old = _updated_at(stage, job_id)
    assert jobs.heartbeat(stage, job_id, Stage.fetch, "task-b") is False  # a stale/duplicate worker
    assert jobs.heartbeat(stage, job_id, Stage.model, "task-a") is False  # not the job's current stage
    assert _updated_at(stage, job_id) == old
    assert jobs.heartbeat(stage, job_id, Stage.fetch, "task-a") is True
    assert _updated_at(stage, job_id) > old

    jobs.hand_off(stage, job, Stage.model, FetchedImages(image_ids=(1,), primary_image_id=1,
                                                         primary_uri="file:///originals/x"))
    _age(stage, job_id)
    assert jobs.heartbeat(stage, job_id, Stage.fetch, "task-a") is False  # handed on: its claim is spent
    assert jobs.release_claim(stage, job_id, "model") is True
    jobs.claim(stage, job_id, Stage.model, "task-m")
    jobs.fail(stage, job_id, ErrorCode.model_error, "broke", retryable=False)
    assert jobs.heartbeat(stage, job_id, Stage.model, "task-m") is False  # ended jobs stay ended


def test_a_heartbeat_never_waits_behind_the_stage_transaction_that_holds_the_row(
        engine, worker_engine) -> None:  # noqa: ANN001
    """Persist holds the job row for its whole transaction; a beat then skips instead of queueing
    behind it (that transaction writes the row anyway). Committed rows: two connections, both as
    ``enrich_worker`` in ``job_session`` (seeded and cleaned up as the superuser)."""
    import time

    from db.repositories import jobs as job_rows

    tenant, job_id = commit_job_at(engine, "hb", "persist")
    factory = sessionmaker(worker_engine, expire_on_commit=False)
    try:
        with job_session(factory, job_id) as s:
            assert jobs.claim(s, job_id, Stage.persist, "task-p") is not None
        with job_session(factory, job_id) as holder:
            assert job_rows.lock(holder, job_id) is not None  # the stage's transaction, still open
            with job_session(factory, job_id) as s:
                s.execute(text("SET LOCAL lock_timeout = '5s'"))
                started = time.monotonic()
                assert jobs.heartbeat(s, job_id, Stage.persist, "task-p") is False
                assert time.monotonic() - started < 1.0
        with job_session(factory, job_id) as s:
            assert jobs.heartbeat(s, job_id, Stage.persist, "task-p") is True  # free again: it beats
    finally:
        with engine.begin() as conn:
            for table in ("enrichment_jobs", "products", "inbox_events", "merchants", "tenants"):
                column = "id" if table == "tenants" else "tenant_id"
                conn.execute(text(f"DELETE FROM {table} WHERE {column} = :t"), {"t": tenant})
