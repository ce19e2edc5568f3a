"""Stage claims: how at-least-once delivery becomes one run per stage."""

from __future__ import annotations

import uuid

import pytest

from db.enums import Stage
from db.tables import EnrichmentJob, InboxEvent, Merchant, Product, Tenant
from tasks.pipeline import jobs
from tasks.errors import ErrorCode, PipelineError
from tasks.pipeline.work import FetchedImages


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


def test_redelivery_reclaims_and_a_concurrent_duplicate_backs_off(db_session, job_id: int) -> None:  # noqa: ANN001
    assert jobs.claim(db_session, job_id, Stage.fetch, "task-a") is not None
    assert jobs.claim(db_session, job_id, Stage.fetch, "task-a") is not None  # same task redelivered
    assert jobs.claim(db_session, job_id, Stage.fetch, "task-b") is None  # another task id: backs off
    job = db_session.get(EnrichmentJob, job_id)
    assert job.attempts == {"fetch": 2} and job.status == "running"


def test_stages_not_reached_or_already_passed_are_no_ops(db_session, job_id: int) -> None:  # noqa: ANN001
    assert jobs.claim(db_session, job_id, Stage.persist, "early") is None  # not reached yet
    job = jobs.claim(db_session, job_id, Stage.fetch, "f")
    jobs.hand_off(db_session, job, Stage.model, FetchedImages(image_ids=(1,), primary_image_id=1,
                                                              primary_uri="file:///originals/x"))
    assert jobs.claim(db_session, job_id, Stage.fetch, "late") is None  # already passed
    assert jobs.claim(db_session, job_id, Stage.model, "m") is not None


def test_a_stage_that_keeps_dying_is_given_up_on_any_broker(db_session, job_id: int) -> None:  # noqa: ANN001
    for _ in range(3):
        assert jobs.claim(db_session, job_id, Stage.fetch, "poison", max_attempts=3) is not None
    with pytest.raises(PipelineError) as info:
        jobs.claim(db_session, job_id, Stage.fetch, "poison", max_attempts=3)
    assert info.value.code is ErrorCode.worker_lost and not info.value.retryable


def test_fail_ends_the_job_once_and_writes_listing_failed(db_session, job_id: int) -> None:  # noqa: ANN001
    from db.tables import OutboxMessage

    assert jobs.fail(db_session, job_id, ErrorCode.image_rejected, "not an image", retryable=False) is True
    assert jobs.fail(db_session, job_id, ErrorCode.model_error, "again", retryable=False) is False
    job = db_session.get(EnrichmentJob, job_id)
    assert (job.status, job.error_code) == ("failed", "image_rejected")
    rows = db_session.query(OutboxMessage).filter_by(tenant_id="t").all()
    assert [r.payload["code"] for r in rows] == ["image_rejected"]
    assert rows[0].payload["causation_id"] == str(job.event_id)
    assert jobs.claim(db_session, job_id, Stage.fetch, "after") is None  # ended jobs claim nothing


def test_the_stage_table_is_the_pipeline_in_order() -> None:
    """Every claimable stage has one row, in the Stage enum's order; each default next stage comes later."""
    assert jobs.STAGE_ORDER == list(Stage)
    for stage, spec in jobs.STAGES.items():
        assert spec.stage is stage and spec.task_name == f"catalog.{stage.value}"
        assert spec.queue in ("cpu", "gpu")
        if spec.next is not None:
            assert jobs.STAGE_ORDER.index(spec.next) > jobs.STAGE_ORDER.index(stage)
    assert jobs.STAGES[Stage.model].queue == "gpu" and jobs.STAGES[jobs.STAGE_ORDER[-1]].next is None


def test_hand_off_moves_the_job_and_dispatches_the_next_stage_through_the_outbox(db_session, job_id: int) -> None:  # noqa: ANN001
    from db.tables import OutboxMessage

    job = jobs.claim(db_session, job_id, Stage.fetch, "f")
    handoff = FetchedImages(image_ids=(7,), primary_image_id=7, primary_uri="file:///originals/x")
    jobs.hand_off(db_session, job, Stage.model, handoff, timings={"fetch": 1.25})
    assert job.stage == "model" and FetchedImages.of(job.work) == handoff and job.timings_ms == {"fetch": 1.2}
    rows = db_session.query(OutboxMessage).filter_by(tenant_id="t").all()
    assert [(r.routing_key, r.payload) for r in rows] == [
        ("task:catalog.model", {"task": "catalog.model", "args": [job_id], "queue": "gpu"})]


def test_release_claim_lets_a_new_task_take_a_stalled_stage(db_session, job_id: int) -> None:  # noqa: ANN001
    jobs.claim(db_session, job_id, Stage.fetch, "dead-worker")
    assert jobs.claim(db_session, job_id, Stage.fetch, "new") is None
    assert jobs.release_claim(db_session, job_id, "fetch") is True
    assert jobs.claim(db_session, job_id, Stage.fetch, "new") is not None


def _age(session, job_id: int, interval: str = "2 hours") -> None:  # noqa: ANN001
    from sqlalchemy import text

    session.execute(text("UPDATE enrichment_jobs SET updated_at = now() - CAST(:i AS interval) WHERE id = :id"),
                    {"i": interval, "id": job_id})


def _updated_at(session, job_id: int):  # noqa: ANN001, ANN202
    from sqlalchemy import text

    return session.execute(text("SELECT updated_at FROM enrichment_jobs WHERE id = :id"), {"id": job_id}).scalar_one()


def test_a_heartbeat_refreshes_only_the_claim_its_task_holds(db_session, job_id: int) -> None:  # noqa: ANN001
    job = jobs.claim(db_session, job_id, Stage.fetch, "task-a")
    _age(db_session, job_id)
    old = _updated_at(db_session, job_id)
    assert jobs.heartbeat(db_session, job_id, Stage.fetch, "task-b") is False  # a stale/duplicate worker
    assert jobs.heartbeat(db_session, job_id, Stage.model, "task-a") is False  # not the job's current stage
    assert _updated_at(db_session, job_id) == old
    assert jobs.heartbeat(db_session, job_id, Stage.fetch, "task-a") is True
    assert _updated_at(db_session, job_id) > old

    jobs.hand_off(db_session, job, Stage.model, FetchedImages(image_ids=(1,), primary_image_id=1,
                                                              primary_uri="file:///originals/x"))
    _age(db_session, job_id)
    assert jobs.heartbeat(db_session, job_id, Stage.fetch, "task-a") is False  # handed on: its claim is spent
    assert jobs.release_claim(db_session, job_id, "model") is True
    jobs.claim(db_session, job_id, Stage.model, "task-m")
    jobs.fail(db_session, job_id, ErrorCode.model_error, "broke", retryable=False)
    assert jobs.heartbeat(db_session, job_id, Stage.model, "task-m") is False  # ended jobs stay ended


def test_a_heartbeat_never_waits_behind_the_stage_transaction_that_holds_the_row(engine) -> None:  # noqa: ANN001
    """Persist holds the job row for its whole transaction; a beat then skips instead of queueing
    behind it (that transaction writes the row anyway). Committed rows: two connections."""
    import time

    from sqlalchemy import text
    from sqlalchemy.orm import Session

    from db.repositories import jobs as job_rows

    tenant = f"hb-{uuid.uuid4().hex[:8]}"
    with Session(engine) as s, s.begin():
        s.add(Tenant(id=tenant))
        s.flush()
        s.add(Merchant(tenant_id=tenant, id="m"))
        s.flush()
        product = Product(tenant_id=tenant, merchant_id="m", external_id="p", version=1, category="dress")
        event = InboxEvent(event_id=uuid.uuid4(), tenant_id=tenant, event_type="product.created", status="accepted")
        s.add_all([product, event])
        s.flush()
        job = EnrichmentJob(tenant_id=tenant, event_id=event.event_id, product_id=product.id, product_version=1,
                            stage="persist")
        s.add(job)
        s.flush()
        job_id = job.id
        assert jobs.claim(s, job_id, Stage.persist, "task-p") is not None
    holder = Session(engine)
    try:
        holder.begin()
        job_rows.lock(holder, job_id)  # the stage's transaction, still open
        with Session(engine) as s, s.begin():
            s.execute(text("SET LOCAL lock_timeout = '5s'"))
            started = time.monotonic()
            assert jobs.heartbeat(s, job_id, Stage.persist, "task-p") is False
            assert time.monotonic() - started < 1.0
        holder.rollback()
        with Session(engine) as s, s.begin():
            assert jobs.heartbeat(s, job_id, Stage.persist, "task-p") is True  # free again: it beats
    finally:
        holder.rollback()
        holder.close()
        with engine.begin() as conn:
            for table in ("enrichment_jobs", "products", "inbox_events", "merchants", "tenants"):
                column = "id" if table == "tenants" else "tenant_id"
                conn.execute(text(f"DELETE FROM {table} WHERE {column} = :t"), {"t": tenant})
