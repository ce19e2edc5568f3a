"""The embedder dataset builder: what becomes a row, incremental reads, the lock, its own read position.

Rows are seeded as the superuser test connection, reviews applied as the intake applies them
(``enrich_worker`` in the tenant), the builder run as beat runs it (``enrich_worker``, no scope set:
it takes the system scope itself). Everything is rolled back at the end of each test.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.orm import Session

from db.repositories import datasets as dataset_rows
from tasks.feedback.datasets import read_split
from tasks.feedback.embedder_data import ADVISORY_LOCK_KEY, BUILDER, EmbedderDataConfig, build_embedder_dataset
from tasks.feedback.pairs import BuildStatus
from tasks.feedback.reviews import apply_review, parse_review_event, review_event_payload
from tasks.io.blobs import LocalBlobStore
from tests.conftest import WORKER_ROLE, in_scope, in_tenant
from tests.tasks.feedback.test_reviews import add_listing

NOW = EmbedderDataConfig(settle=timedelta(0), holdout_fraction=0.0)


def _review(session: Session, tenant: str, listing_id: int, decision: str, corrected: dict | None = None) -> None:
    payload = review_event_payload(tenant_id=tenant, merchant_id="m1", listing_id=listing_id, decision=decision,
                                   corrected=corrected)
    with in_tenant(session, tenant):
        apply_review(session, parse_review_event(json.dumps(payload).encode(), "application/json"))


def _build(session: Session, store: LocalBlobStore):  # noqa: ANN202
    with in_scope(session, WORKER_ROLE):
        return build_embedder_dataset(session, store, NOW)


def test_rows_carry_crop_facts_and_identity(db_session: Session, tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    accepted = add_listing(db_session, "ed-a", "p1")  # dress: neckline dropped by verification
    edited = add_listing(db_session, "ed-a", "p2")
    rejected = add_listing(db_session, "ed-b", "p3")
    db_session.execute(text("UPDATE listings SET content = jsonb_set(content, '{attributes,material}', "
                            "'{\"value\": \"silk\", \"source\": \"merchant\"}') WHERE id = :i"), {"i": accepted})
    _review(db_session, "ed-a", accepted, "accepted")
    _review(db_session, "ed-a", edited, "edited", {"attributes": {"color": "blue"}})
    _review(db_session, "ed-b", rejected, "rejected")
    result = _build(db_session, store)
    assert result.status == BuildStatus.built and result.pairs == 2
    assert result.dropped == {"superseded_review": 0, "listing_rejected": 1}
    rows = {r["listing_id"]: r for r in read_split(store, result.uri, "train")}
    assert set(rows) == {accepted, edited}
    first = rows[accepted]
    # Visual, verified facts only: material is merchant-only, neckline was dropped by verification.
    assert first["attributes"] == {"color": "red", "pattern": "floral", "sleeve_length": "short", "length": "knee"}
    assert first["image_box"] is None and first["category"] == "dress" and first["external_id"] == "p1"
    assert rows[edited]["attributes"]["color"] == "blue" and rows[edited]["attribute_sources"]["color"] == "merchant"
    assert rows[edited]["decision"] == "edited"
    dataset = dataset_rows.dataset_named(db_session, result.name)
    assert dataset is not None and dataset.manifest["format"] == "clip-contrastive-jsonl/1"
    assert dataset.watermark_feedback_id == 0  # the pair builder's read floor is not moved
    assert _build(db_session, store).status == BuildStatus.empty  # incremental: nothing new


def test_a_later_rejection_removes_the_listing(db_session: Session, tmp_path: Path) -> None:
    lid = add_listing(db_session, "ed-c", "p1")
    _review(db_session, "ed-c", lid, "accepted")
    _review(db_session, "ed-c", lid, "rejected")
    result = _build(db_session, LocalBlobStore(tmp_path))
    assert result.status == BuildStatus.empty
    assert result.dropped == {"superseded_review": 1, "listing_rejected": 1}


def test_its_read_position_is_its_own(db_session: Session, tmp_path: Path) -> None:
    lid = add_listing(db_session, "ed-d", "p1")
    _review(db_session, "ed-d", lid, "accepted")
    # A DPO dataset that consumed feedback far ahead must not make this builder skip anything.
    db_session.execute(text("INSERT INTO training_datasets (name, uri, content_hash, manifest, watermark_feedback_id, "
                            "window_end) VALUES ('dpo-x', 'file:///x', 'h', '{}', 10000000, now())"))
    result = _build(db_session, LocalBlobStore(tmp_path))
    assert result.status == BuildStatus.built and result.pairs == 1
    assert dataset_rows.read_position_of(db_session, BUILDER) == result.watermark


def test_a_concurrent_run_is_skipped(db_session: Session, engine, tmp_path: Path) -> None:  # noqa: ANN001
    with engine.connect() as other:
        other.execute(text("SELECT pg_advisory_lock(:k)"), {"k": ADVISORY_LOCK_KEY})
        try:
            assert _build(db_session, LocalBlobStore(tmp_path)).status == BuildStatus.skipped
        finally:
            other.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": ADVISORY_LOCK_KEY})
