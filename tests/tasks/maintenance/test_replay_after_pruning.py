"""A replay older than the idempotency window, through the real intake after the real pruner.

Two versions of a product go through the whole pipeline (real photos, fetch, model stage with the
test batcher, persist), their history ages past every retention window, the pruner removes the
old job and its inbox row, and the first version's event is delivered again byte for byte: the
inbox no longer knows it, so the intake treats it as new, and the product version guard answers
it with ``listing.failed`` / ``stale_version`` and leaves the product and its listing as version 2
made them. Inside the window (before pruning, or for an event whose job is still kept) the same
replay is a duplicate: no event at all.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from db.engine import tenant_session
from models.images import ImageLimits
from tasks.events import parse_product_event, product_event_payload
from tasks.io.blobs import LocalBlobStore, result_key
from tasks.maintenance.retention import RetentionPolicy, run_retention
from tasks.pipeline.fetch import fetch_and_dedup
from tasks.pipeline.intake import Outcome, accept_product_event
from tasks.pipeline.model import model_stage
from tasks.pipeline.persist import persist
from tasks.runtime import Runtime
from tests.conftest import WORKER_ROLE, as_role
from tests.db.catalog_rows import add_model_version, add_tenant
from tests.tasks.maintenance.bookkeeping_rows import ids
from tests.tasks.pipeline.test_superseded import FakeBatcher, FakeFetcher

TENANT = "replay-acme"
URLS = {1: "https://img.example/replay-v1.jpg", 2: "https://img.example/replay-v2.jpg"}


@pytest.fixture
def env(db_session: Session, tmp_path: Path, sample_photos: list[tuple[Path, str]]) -> SimpleNamespace:
    model_ids = {kind: add_model_version(db_session, kind, f"{kind}-replay", dims=8 if kind == "clip" else None)
                 for kind in ("detector", "vlm", "clip")}
    add_tenant(db_session, TENANT)
    factory = sessionmaker(bind=db_session.connection(), join_transaction_mode="create_savepoint",
                           expire_on_commit=False)
    runtime = Runtime(session_factory=factory, blobs=LocalBlobStore(tmp_path / "originals"),
                      fetcher=FakeFetcher({URLS[1]: sample_photos[0][0].read_bytes(),  # type: ignore[arg-type]
                                           URLS[2]: sample_photos[3][0].read_bytes()}),
                      publisher=None, image_limits=ImageLimits(), models_factory=None,  # type: ignore[arg-type]
                      heartbeat_s=0)
    runtime._batcher = FakeBatcher(model_ids)  # type: ignore[assignment]
    return SimpleNamespace(session=db_session, factory=factory, runtime=runtime)


def _event_bytes(version: int) -> bytes:
    payload = product_event_payload(
        event_type="product.created" if version == 1 else "product.updated", tenant_id=TENANT, merchant_id="m1",
        external_id="sku-replay", version=version, category="dress", image_urls=[URLS[version]],
        title=f"Version {version} title", description=f"Version {version} description")
    return json.dumps(payload).encode()


def _deliver(env: SimpleNamespace, body: bytes) -> Outcome:
    """What the events worker does with one product event (workers.intake), as enrich_worker."""
    event = parse_product_event(body, "application/json", json.loads(body)["event_type"])
    with as_role(env.session, WORKER_ROLE), tenant_session(env.factory, TENANT) as session:
        result = accept_product_event(session, event)
    if result.outcome is Outcome.accepted:
        assert result.job_id is not None
        with as_role(env.session, WORKER_ROLE):
            task = f"task-{uuid.uuid4()}"
            fetch_and_dedup(env.runtime, result.job_id, task)
            assert model_stage(env.runtime, result.job_id, task)
            assert persist(env.runtime, result.job_id, task)
    return result.outcome


def _product(s: Session) -> tuple[int, str]:
    row = s.execute(text("SELECT version, title FROM products WHERE tenant_id = :t"), {"t": TENANT}).one()
    return row.version, row.title


def _stale_answers(s: Session, event_id: str) -> int:
    return s.execute(text("SELECT count(*) FROM outbox WHERE routing_key = 'listing.failed' "
                          "AND payload ->> 'causation_id' = :e AND payload ->> 'code' = 'stale_version'"),
                     {"e": event_id}).scalar_one()


def test_an_old_event_replayed_after_its_inbox_row_was_pruned_changes_nothing(env: SimpleNamespace) -> None:
    s = env.session
    v1, v2 = _event_bytes(1), _event_bytes(2)
    v1_id, v2_id = json.loads(v1)["event_id"], json.loads(v2)["event_id"]
    assert _deliver(env, v1) is Outcome.accepted
    assert _deliver(env, v2) is Outcome.accepted
    job1, job2 = sorted(ids(s, "enrichment_jobs"))
    assert all(env.runtime.blobs.exists(result_key(j)) for j in (job1, job2))
    assert _deliver(env, v1) is Outcome.duplicate  # inside the window: a no-op, no event
    assert _stale_answers(s, v1_id) == 0

    # Ten days pass (every bookkeeping timestamp of this tenant moves back), then beat prunes.
    for table, columns in (("inbox_events", ("received_at",)), ("enrichment_jobs", ("created_at", "finished_at")),
                           ("outbox", ("created_at", "published_at"))):
        moved = ", ".join(f"{c} = {c} - interval '10 days'" for c in columns)
        s.execute(text(f"UPDATE {table} SET {moved} WHERE tenant_id = :t"), {"t": TENANT})
    with as_role(s, WORKER_ROLE):
        report = run_retention(env.factory, env.runtime.blobs, RetentionPolicy())
    assert report.caught_up and report.deleted["jobs"] == 1 and report.deleted["result_documents"] == 2
    assert ids(s, "enrichment_jobs") == {job2}  # the newest job stays: the reconciler reads it
    inbox = ids(s, "inbox_events", "event_id")
    assert uuid.UUID(v1_id) not in inbox and uuid.UUID(v2_id) in inbox
    assert not any(env.runtime.blobs.exists(result_key(j)) for j in (job1, job2))

    # The old event again: the inbox has forgotten it, the version guard has not.
    assert _deliver(env, v1) is Outcome.stale
    assert _product(s) == (2, "Version 2 title")
    assert ids(s, "enrichment_jobs") == {job2}  # no job for the replay
    listings = s.execute(text("SELECT product_version, content ->> 'title' FROM listings WHERE tenant_id = :t"),
                         {"t": TENANT}).all()
    assert [tuple(r) for r in listings] == [(1, "Version 1 title"), (2, "Version 2 title")]
    assert _stale_answers(s, v1_id) == 1
    # ... and once more: the replay itself is in the inbox now, so this one is a plain duplicate.
    assert _deliver(env, v1) is Outcome.duplicate and _stale_answers(s, v1_id) == 1
    # The newest version's event is still inside its window (its job is kept): a duplicate.
    assert _deliver(env, v2) is Outcome.duplicate and _stale_answers(s, v2_id) == 0
