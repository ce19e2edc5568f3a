"""Retention against the real database: what expires disappears, what is live or recent never does,
figures survive in the summaries, runs are bounded and one pruner runs at a time.

Run as ``enrich_worker`` in the system scope, as beat's ``catalog.prune`` runs (``enrich prune``, as
``enrich_admin``, is covered in tests/workers/test_retention_cli.py); rows are seeded as the
superuser first.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from db.repositories import retention as retention_rows
from tasks.io.blobs import LocalBlobStore, result_key
from tasks.maintenance.retention import ADVISORY_LOCK_KEY, RetentionPolicy, run_retention
from tests.conftest import ADMIN_ROLE, WORKER_ROLE, as_role
from tests.db.catalog_rows import add_listings, add_model_version, add_products, add_tenant
from tests.tasks.maintenance.bookkeeping_rows import DAY, add_dead_letter, add_event, add_job, add_outbox, ids

HOUR = timedelta(hours=1)
TENANT = "ret-a"


def _factory(session: Session) -> sessionmaker[Session]:
    """Sessions on the test's connection and role: each batch commit releases a savepoint only."""
    return sessionmaker(bind=session.connection(), join_transaction_mode="create_savepoint", expire_on_commit=False)


@pytest.fixture
def blobs(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "originals")


def _status(session: Session, monkeypatch: pytest.MonkeyPatch) -> dict:
    from workers import status

    monkeypatch.setattr(status, "get_admin_session_factory", lambda: _factory(session))
    with as_role(session, ADMIN_ROLE):
        return status.collect_status()


def test_expired_rows_go_and_live_ones_stay(db_session: Session, blobs: LocalBlobStore,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    s = db_session
    add_tenant(s, TENANT)
    p1, p2, p3 = add_products(s, TENANT, ["p1", "p2", "p3"], ["dress"] * 3)
    timings = {"fetch": 40.0, "model": 700.0}
    j1_old, e1_old = add_job(s, TENANT, p1, status="done", created=10 * DAY, finished=10 * DAY - HOUR,
                             ran_model=True, timings=timings)
    j1_new, e1_new = add_job(s, TENANT, p1, status="done", created=9 * DAY, finished=9 * DAY - HOUR,
                             ran_model=True, timings=timings)
    j2_live, e2_live = add_job(s, TENANT, p2, status="running", created=10 * DAY, ran_model=True)
    j3_old, e3_old = add_job(s, TENANT, p3, status="failed", created=8 * DAY, finished=8 * DAY,
                             error_code="fetch_timeout", timings={"fetch": 12_000.0})
    j3_recent, e3_recent = add_job(s, TENANT, p3, status="done", created=HOUR / 2, finished=timedelta(minutes=10),
                                   ran_model=True)
    for job in (j1_old, j1_new, j2_live, j3_recent):
        blobs.put(result_key(job), b'{"result": "document"}')
    stale_old = add_event(s, TENANT, age=8 * DAY, status="stale", event_type="product.updated")
    stale_recent = add_event(s, TENANT, age=DAY, status="stale", event_type="product.updated")
    vlm = add_model_version(s, "vlm", "vlm-retention")
    (listing,) = add_listings(s, TENANT, [p1], ["dress"], vlm_id=vlm)
    review_event = add_event(s, TENANT, age=30 * DAY, event_type="listing.reviewed")
    s.execute(text("INSERT INTO review_feedback (tenant_id, event_id, listing_id, decision, reviewer) "
                   "VALUES (:t, :e, :l, 'accepted', 'merchant')"), {"t": TENANT, "e": review_event, "l": listing})
    out_old, out_recent, out_unsent = (add_outbox(s, published=2 * DAY), add_outbox(s, published=HOUR),
                                       add_outbox(s, published=None))
    s.execute(text("UPDATE outbox SET created_at = now() - interval '5 days' WHERE id = :i"), {"i": out_unsent})
    dl_old = add_dead_letter(s, age=40 * DAY, resolved=31 * DAY, resolution="discarded")
    dl_recent = add_dead_letter(s, age=40 * DAY, resolved=DAY, resolution="replayed")
    dl_open = add_dead_letter(s, age=100 * DAY)
    s.execute(text("INSERT INTO job_summaries (hour, status, error_code, jobs) VALUES "
                   "(date_trunc('hour', now() - interval '401 days', 'UTC'), 'done', '', 5), "
                   "(date_trunc('hour', now() - interval '10 days', 'UTC'), 'done', '', 7)"))
    before = _status(s, monkeypatch)

    with as_role(s, WORKER_ROLE):
        report = run_retention(_factory(s), blobs, RetentionPolicy(batch_size=50))

    assert report.caught_up and not report.busy
    assert report.deleted == {"outbox": 1, "result_documents": 2, "jobs": 2, "inbox": 3, "dead_letters": 1,
                              "summaries": 1}
    assert ids(s, "enrichment_jobs") >= {j1_new, j2_live, j3_recent}
    assert not ids(s, "enrichment_jobs") & {j1_old, j3_old}
    inbox = ids(s, "inbox_events", "event_id")
    assert {e1_new, e2_live, e3_recent, stale_recent, review_event} <= inbox
    assert not inbox & {e1_old, e3_old, stale_old}
    assert {out_recent, out_unsent} <= ids(s, "outbox") and out_old not in ids(s, "outbox")
    assert {dl_recent, dl_open} <= ids(s, "dead_letters") and dl_old not in ids(s, "dead_letters")
    # Documents of finished jobs go (the newest job of a product too: its listing is committed);
    # a live job's document, and one finished less than results_keep ago, stay.
    assert [blobs.exists(result_key(j)) for j in (j1_old, j1_new, j2_live, j3_recent)] == [False, False, True, True]

    # The deleted jobs live on in the summaries: counts by outcome and code, stage histograms.
    summaries = s.execute(text("SELECT status, error_code, sum(jobs) FROM job_summaries "
                               "WHERE hour > now() - interval '30 days' GROUP BY 1, 2 ORDER BY 1, 2")).all()
    assert [tuple(r) for r in summaries] == [("done", "", 8), ("failed", "fetch_timeout", 1)]
    buckets = s.execute(text("SELECT stage, le_ms, sum(jobs) FROM job_stage_timings GROUP BY 1, 2 "
                             "ORDER BY 1, 2")).all()
    assert [tuple(r) for r in buckets] == [("fetch", 50.0, 1), ("fetch", 30_000.0, 1), ("model", 1_000.0, 1),
                                           ("total", 10.0, 1), ("total", 3_600_000.0, 1)]
    intake = s.execute(text("SELECT event_type, status, sum(events) FROM inbox_summaries GROUP BY 1, 2 "
                            "ORDER BY 1, 2")).all()
    assert [tuple(r) for r in intake] == [("product.created", "accepted", 2), ("product.updated", "stale", 1)]

    # enrich status adds the summaries to the live rows: no figure dropped, except the 5 jobs of
    # the summary hour past summaries_keep (400 days).
    after = _status(s, monkeypatch)
    assert after["jobs_by_status"] == {**before["jobs_by_status"], "done": before["jobs_by_status"]["done"] - 5}
    for key in ("failures_by_code", "intake"):
        assert after[key] == before[key], key
    assert after["dead_letters"] == before["dead_letters"] == 1  # only the unresolved one counts
    assert after["stage_timings_ms_24h"]["total"]["jobs"] >= 1


def test_a_run_is_bounded_and_the_next_one_carries_on(db_session: Session, blobs: LocalBlobStore) -> None:
    s = db_session
    expired = {add_outbox(s, published=3 * DAY) for _ in range(35)}
    sizes: list[int] = []
    with as_role(s, WORKER_ROLE):
        tight = RetentionPolicy(batch_size=10, max_run_s=1e-6)
        first = run_retention(_factory(s), blobs, tight, passes=("outbox",),
                              on_batch=lambda r: sizes.append(r.deleted["outbox"]))
        assert (first.batches, first.deleted["outbox"], first.caught_up) == (1, 10, False)
        assert expired & ids(s, "outbox")  # the rest waits for the next run
        rest = run_retention(_factory(s), blobs, RetentionPolicy(batch_size=10), passes=("outbox",),
                             on_batch=lambda r: sizes.append(10 + r.deleted["outbox"]))
    assert rest.caught_up and rest.deleted["outbox"] == 25
    assert not expired & ids(s, "outbox")
    assert all(b - a <= 10 for a, b in zip([0, *sizes], sizes, strict=False))  # never more than a batch at once


def test_jobs_wait_for_the_result_pass_so_a_document_never_outlives_its_job(db_session: Session,
                                                                            blobs: LocalBlobStore) -> None:
    s = db_session
    add_tenant(s, TENANT)
    (product,) = add_products(s, TENANT, ["solo"], ["hat"])
    old, _ = add_job(s, TENANT, product, status="done", created=9 * DAY, finished=9 * DAY, ran_model=True)
    add_job(s, TENANT, product, status="done", created=8 * DAY, finished=8 * DAY, ran_model=True)
    blobs.put(result_key(old), b"{}")
    with as_role(s, WORKER_ROLE):
        alone = run_retention(_factory(s), blobs, RetentionPolicy(), passes=("jobs",))
        assert alone.deleted["jobs"] == 0 and old in ids(s, "enrichment_jobs")
        both = run_retention(_factory(s), blobs, RetentionPolicy(), passes=("result_documents", "jobs"))
    assert both.deleted["result_documents"] == 1 and both.deleted["jobs"] == 1  # the one document stored
    assert old not in ids(s, "enrichment_jobs") and not blobs.exists(result_key(old))


def test_the_newest_job_of_a_product_goes_once_a_later_job_replaces_it(db_session: Session,
                                                                       blobs: LocalBlobStore) -> None:
    """The reconciler reads a product's newest job, so it is kept past the window; a later job
    (even one finished long after the cursor passed the old one) takes it along."""
    s = db_session
    add_tenant(s, TENANT)
    (product,) = add_products(s, TENANT, ["slow"], ["shoes"])
    first, _ = add_job(s, TENANT, product, status="done", created=20 * DAY, finished=20 * DAY)
    with as_role(s, WORKER_ROLE):
        run_retention(_factory(s), blobs, RetentionPolicy())
        assert first in ids(s, "enrichment_jobs")
    second, _ = add_job(s, TENANT, product, status="done", created=12 * DAY, finished=12 * DAY)
    with as_role(s, WORKER_ROLE):
        report = run_retention(_factory(s), blobs, RetentionPolicy())
    assert report.deleted["jobs"] == 1
    assert first not in ids(s, "enrichment_jobs") and second in ids(s, "enrichment_jobs")
    with as_role(s, WORKER_ROLE):
        assert run_retention(_factory(s), blobs, RetentionPolicy()).deleted["jobs"] == 0


def test_a_second_pruner_stops_while_the_first_holds_the_lock(db_session: Session, engine,  # noqa: ANN001
                                                              blobs: LocalBlobStore) -> None:
    s = db_session
    expired = add_outbox(s, published=3 * DAY)
    with engine.connect() as other, other.begin():
        other.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ADVISORY_LOCK_KEY})
        with as_role(s, WORKER_ROLE):
            report = run_retention(_factory(s), blobs, RetentionPolicy())
    assert report.busy and not report.caught_up and sum(report.deleted.values()) == 0
    assert expired in ids(s, "outbox")


def test_a_role_that_cannot_see_every_tenant_is_refused(db_session: Session, blobs: LocalBlobStore) -> None:
    """The reader role has no system-scope policy: pruning as it would see (and summarise) nothing."""
    from db.engine import DatabaseUnavailable

    with as_role(db_session, "enrich_reader"), pytest.raises(DatabaseUnavailable, match="cannot see every tenant"):
        run_retention(_factory(db_session), blobs, RetentionPolicy())


def test_beat_schedules_the_task_with_the_settings_policy(db_session: Session, blobs: LocalBlobStore) -> None:
    """``catalog.prune`` as beat sends it: its keyword arguments are the ENRICH_RETENTION__* values."""
    from tasks.maintenance import tasks as maintenance_tasks
    from tasks.runtime import Runtime, install_runtime
    from workers.celery_app import TASK_MODULES, app

    entry = app.conf.beat_schedule["prune-bookkeeping"]
    assert entry["task"] == maintenance_tasks.prune.name == "catalog.prune"
    assert "tasks.maintenance.tasks" in TASK_MODULES
    kwargs = dict(entry["kwargs"], outbox_keep_s=3600)
    expired, kept = add_outbox(db_session, published=2 * HOUR), add_outbox(db_session, published=HOUR / 2)
    install_runtime(Runtime(session_factory=_factory(db_session), blobs=blobs, fetcher=None,  # type: ignore[arg-type]
                            publisher=None, image_limits=None, models_factory=None))  # type: ignore[arg-type]
    try:
        with as_role(db_session, WORKER_ROLE):
            result = maintenance_tasks.prune.run(**kwargs)
    finally:
        install_runtime(None)
    assert result["deleted"]["outbox"] >= 1 and result["caught_up"] is True
    assert expired not in ids(db_session, "outbox") and kept in ids(db_session, "outbox")


def test_summaries_fold_into_existing_hours(db_session: Session) -> None:
    """Two batches of the same hour add up (ON CONFLICT … DO UPDATE), they do not overwrite."""
    s = db_session
    add_tenant(s, TENANT)
    products = add_products(s, TENANT, [f"x{i}" for i in range(4)], ["hat"] * 4)
    for pid in products:
        for _ in range(2):
            add_job(s, TENANT, pid, status="done", created=8 * DAY, finished=8 * DAY, timings={"fetch": 5.0})
    with as_role(s, WORKER_ROLE):
        run_retention(_factory(s), None, RetentionPolicy(batch_size=2), passes=("result_documents", "jobs"))
    rows = s.execute(text("SELECT jobs FROM job_summaries WHERE hour > now() - interval '9 days'")).scalars().all()
    fetch = s.execute(text("SELECT jobs, sum_ms FROM job_stage_timings WHERE stage = 'fetch' AND le_ms = 10")).one()
    assert rows == [4] and tuple(fetch) == (4, 20.0)  # one row per hour, added to by every batch
    assert retention_rows.summarised_jobs_by_status(s) == {"done": 4}
