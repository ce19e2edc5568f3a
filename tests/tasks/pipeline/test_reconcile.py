"""Coverage reconciler: which products are re-queued and why, and the counts ``enrich status`` shows.

Rows are seeded as the superuser test connection; the reconciler then runs as production runs it,
under forced row-level security in the system scope: as ``enrich_worker`` on beat
(``catalog.reconcile``) and as ``enrich_admin`` from ``enrich reconcile`` / ``enrich status``.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import numpy as np
import pytest
from sqlalchemy import text

from tasks.pipeline.reconcile import Reason, coverage_counts, find_incomplete_products, reconcile, requeue
from tests.conftest import ADMIN_ROLE, WORKER_ROLE, in_scope, in_system_scope, in_tenant
from tests.db.catalog_rows import (
    add_embeddings,
    add_listings,
    add_model_version,
    add_products,
    add_tenant,
    unit_rows,
)


def _job(session, tenant: str, product_id: int, *, status: str, stage: str | None = None,  # noqa: ANN001
         age: str = "0 seconds", retryable: bool | None = None) -> int:
    event = uuid.uuid4()
    session.execute(text("INSERT INTO inbox_events (event_id, tenant_id, event_type, status) "
                         "VALUES (:e, :t, 'product.created', 'accepted')"), {"e": event, "t": tenant})
    return int(session.execute(
        text("INSERT INTO enrichment_jobs (tenant_id, event_id, product_id, product_version, status, stage, "
             "error_code, retryable, work, updated_at) VALUES (:t, :e, :p, 1, :s, :st, :code, :r, "
             "CAST(:w AS jsonb), now() - CAST(:age AS interval)) RETURNING id"),
        {"t": tenant, "e": event, "p": product_id, "s": status, "st": stage,
         "code": "model_error" if status == "failed" else None, "r": retryable, "age": age,
         "w": '{"image_urls": [["https://img.example/1.jpg", "primary"]], "claims": {"model": "dead-task"}}'},
    ).scalar_one())


@pytest.mark.parametrize("role", [WORKER_ROLE, ADMIN_ROLE])
def test_reasons_and_counts(db_session, role: str) -> None:  # noqa: ANN001
    s = db_session
    vlm = add_model_version(s, "vlm", "vlm-a")
    clip = add_model_version(s, "clip", "clip-a", dims=8)
    add_tenant(s, "acme")
    names = ["complete", "no_listing", "no_embedding", "stalled", "in_flight", "failed_retry", "failed_perm"]
    pids = dict(zip(names, add_products(s, "acme", names, ["dress"] * len(names)), strict=True))
    listed = [pids[n] for n in ("complete", "no_embedding")]
    lids = add_listings(s, "acme", listed, ["dress"] * 2, vlm_id=vlm)
    add_embeddings(s, "acme", [pids["complete"]], lids[:1], ["dress"], unit_rows(np.random.default_rng(0), 1, 8),
                   clip_id=clip)
    for name in ("complete", "no_listing", "no_embedding"):
        _job(s, "acme", pids[name], status="done", stage="persist")
    stalled_job = _job(s, "acme", pids["stalled"], status="running", stage="model", age="2 hours")
    _job(s, "acme", pids["in_flight"], status="running", stage="model", age="1 minute")
    _job(s, "acme", pids["failed_retry"], status="failed", retryable=True)
    _job(s, "acme", pids["failed_perm"], status="failed", retryable=False)

    with in_scope(s, role):  # no system scope: forced row-level security shows this role no product
        assert find_incomplete_products(s) == [] and coverage_counts(s)["products"] == 0
    with in_system_scope(s, role):
        found = {i.external_id: i for i in find_incomplete_products(s, stalled_after=timedelta(minutes=30))}
        assert {k: v.reason for k, v in found.items()} == {
            "no_listing": Reason.missing_listing, "no_embedding": Reason.missing_embedding,
            "stalled": Reason.job_stalled, "failed_retry": Reason.job_failed_retryable}
        assert found["stalled"].job_id == stalled_job and found["stalled"].job_stage == "model"
        assert find_incomplete_products(s, tenant_id="other") == []

        assert coverage_counts(s) == {"products": 7, "complete": 1, "in_flight": 1, "job_stalled": 1,
                                      "job_failed_retryable": 1, "missing_listing": 1, "missing_embedding": 1,
                                      "failed_permanently": 1}

    # A new clip version becoming active makes every product miss its embedding.
    add_model_version(s, "clip", "clip-b", dims=8)
    with in_system_scope(s, role):
        assert coverage_counts(s)["complete"] == 0


@pytest.mark.parametrize("role", [WORKER_ROLE, ADMIN_ROLE])
def test_requeue_releases_stalled_claim_and_creates_new_jobs(db_session, role: str) -> None:  # noqa: ANN001
    s = db_session
    add_model_version(s, "vlm", "vlm-a")
    add_tenant(s, "acme")
    stalled_pid, missing_pid = add_products(s, "acme", ["stalled", "missing"], ["dress", "dress"])
    stalled_job = _job(s, "acme", stalled_pid, status="running", stage="model", age="2 hours")
    _job(s, "acme", missing_pid, status="done", stage="persist")

    with in_scope(s, role):  # reconcile() sets the system scope itself, for the rest of its transaction
        dispatches = reconcile(s)
        by_job = {d.job_id: d.stage for d in dispatches}
        assert by_job[stalled_job] == "model"
        claims = s.execute(text("SELECT work -> 'claims' FROM enrichment_jobs WHERE id = :id"),
                           {"id": stalled_job}).scalar_one()
        assert "model" not in claims
        new_job = next(j for j in by_job if j != stalled_job)
        row = s.execute(text("SELECT j.status, j.product_id, j.work, i.event_type FROM enrichment_jobs j "
                             "JOIN inbox_events i ON i.event_id = j.event_id WHERE j.id = :id"),
                        {"id": new_job}).one()
        assert (row.status, row.product_id, row.event_type) == ("pending", missing_pid, "reconcile")
        assert row.work["image_urls"] == [["https://img.example/1.jpg", "primary"]]
        # The re-queued product is now in flight: a second pass finds nothing to do.
        assert {i.external_id for i in find_incomplete_products(s)} == set()


def test_requeue_without_any_job_has_nothing_to_run(db_session) -> None:  # noqa: ANN001
    s = db_session
    add_model_version(s, "vlm", "vlm-a")
    add_tenant(s, "acme")
    add_products(s, "acme", ["orphan"], ["dress"])
    with in_system_scope(s, WORKER_ROLE):
        (item,) = find_incomplete_products(s)
        assert item.reason is Reason.missing_listing and requeue(s, item) is None


def _set_work(session, job_id: int, work: str) -> None:  # noqa: ANN001
    session.execute(text("UPDATE enrichment_jobs SET work = CAST(:w AS jsonb) WHERE id = :id"), {"w": work, "id": job_id})


def test_stalled_means_heartbeats_stopped_for_a_claim_and_a_long_queue_wait_otherwise(db_session) -> None:  # noqa: ANN001
    """A claimed stage is stalled a few heartbeats after its last beat; a job no task holds is
    waiting in a queue (backlog), and is stalled only after the much longer queueing allowance."""
    s = db_session
    add_model_version(s, "vlm", "vlm-a")
    add_tenant(s, "acme")
    names = ["claimed_silent", "claimed_beating", "queued_2h", "handed_on_2h", "queued_25h"]
    pids = dict(zip(names, add_products(s, "acme", names, ["dress"] * len(names)), strict=True))
    _job(s, "acme", pids["claimed_silent"], status="running", stage="model", age="10 minutes")
    _job(s, "acme", pids["claimed_beating"], status="running", stage="model", age="5 minutes")
    never_claimed = '{"image_urls": [["https://img.example/1.jpg", "primary"]]}'
    _set_work(s, _job(s, "acme", pids["queued_2h"], status="pending", age="2 hours"), never_claimed)
    # fetch finished and handed the job to model; no model task has claimed it yet (GPU backlog)
    handed_on = '{"image_urls": [["https://img.example/1.jpg", "primary"]], "claims": {"fetch": "f-task"}}'
    _set_work(s, _job(s, "acme", pids["handed_on_2h"], status="running", stage="model", age="2 hours"), handed_on)
    _set_work(s, _job(s, "acme", pids["queued_25h"], status="pending", age="25 hours"), never_claimed)

    with in_system_scope(s, WORKER_ROLE):
        found = {i.external_id: i.reason for i in find_incomplete_products(
            s, stalled_after=timedelta(minutes=6), queued_after=timedelta(hours=24))}
        assert found == {"claimed_silent": Reason.job_stalled, "queued_25h": Reason.job_stalled}
        counts = coverage_counts(s, stalled_after=timedelta(minutes=6), queued_after=timedelta(hours=24))
        assert (counts["job_stalled"], counts["in_flight"]) == (2, 3)


def test_a_heartbeat_keeps_a_long_running_claim_from_being_redispatched(db_session) -> None:  # noqa: ANN001
    from db.enums import Stage
    from tasks.pipeline import jobs

    s = db_session
    add_model_version(s, "vlm", "vlm-a")
    add_tenant(s, "acme")
    (pid,) = add_products(s, "acme", ["slow"], ["dress"])
    job_id = _job(s, "acme", pid, status="running", stage="model", age="2 hours")  # claimed by "dead-task"
    with in_tenant(s, "acme"):  # the beat's job_session: the job's tenant
        assert jobs.heartbeat(s, job_id, Stage.model, "dead-task") is True  # …which is alive after all, and beats
    with in_scope(s, WORKER_ROLE):  # beat: reconcile() sets the system scope
        assert reconcile(s, stalled_after=timedelta(minutes=6)) == []
        assert s.execute(text("SELECT work -> 'claims' ->> 'model' FROM enrichment_jobs WHERE id = :id"),
                         {"id": job_id}).scalar_one() == "dead-task"  # its claim was not released
