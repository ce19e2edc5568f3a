"""The pair builder after merchant edits (the model's side is never the edited content) and its read
position (runs that make no pair still move it, so the builder cannot starve).

Listings are seeded as the superuser test connection and reviewed as the intake does
(``enrich_worker``, tenant scope: ``test_reviews.review``); the builder runs as beat runs it,
``enrich_worker`` under forced row-level security (``enrich_admin`` for ``enrich retrain
build-pairs``), with no scope set beforehand: it sets the system scope itself.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from db.tables import Listing
from tasks.feedback.datasets import read_split
from tasks.feedback.pairs import BuildResult, BuildStatus, RetrainConfig, build_preference_pairs
from tasks.feedback.reviews import review_event_payload
from tasks.io.blobs import BlobStore, LocalBlobStore
from tests.conftest import ADMIN_ROLE, WORKER_ROLE, in_scope
from tests.tasks.feedback.test_reviews import MODEL_OUTPUT, add_listing, review

NOW = RetrainConfig(settle=timedelta(0), holdout_fraction=0.0)
BUILDER = "dpo-pairs"  # the pair builder's row in builder_watermarks


def _review(s: Session, tenant: str, listing_id: int, decision: str, corrected: dict[str, Any] | None = None,
            at: datetime | None = None) -> int:
    payload = review_event_payload(tenant_id=tenant, merchant_id="m1", listing_id=listing_id, decision=decision,
                                   corrected=corrected)
    if at is not None:
        payload["occurred_at"] = at.isoformat()
    result = review(s, payload)
    assert result.feedback_id is not None
    return result.feedback_id


def build(s: Session, store: BlobStore, config: RetrainConfig = NOW, role: str = WORKER_ROLE) -> BuildResult:
    """One builder run as ``role``, with no tenant or scope set: the builder sets the system scope."""
    with in_scope(s, role):
        return build_preference_pairs(s, store, config)


def _rows(store: LocalBlobStore, uri: str | None) -> list[dict[str, Any]]:
    assert uri is not None
    return read_split(store, uri, "train") + read_split(store, uri, "holdout")


def _position(s: Session) -> int | None:
    return s.execute(text("SELECT watermark FROM builder_watermarks WHERE builder = :b"), {"b": BUILDER}).scalar()


def test_pairs_take_the_model_side_from_model_output_and_generated_content(db_session: Session,
                                                                           tmp_path: Path) -> None:
    s, store = db_session, LocalBlobStore(tmp_path / "datasets")
    listing_id = add_listing(s, "pb-model", "dress-1", dropped={"neckline"})
    t0 = datetime.now(UTC) - timedelta(minutes=10)
    _review(s, "pb-model", listing_id, "edited", {"title": "A red summer dress", "attributes": {"color": "blue"}},
            at=t0)
    listing = s.get(Listing, listing_id)
    assert listing is not None and listing.content["title"] == "A red summer dress"  # the catalog serves the edit
    with in_scope(s, WORKER_ROLE):  # no scope: the feedback is there only for the builder's system scope
        assert s.execute(text("SELECT count(*) FROM review_feedback")).scalar_one() == 0

    edit = build(s, store)
    [row] = _rows(store, edit.uri)
    assert row["source"] == "merchant_correction"
    assert row["rejected"] == _json(MODEL_OUTPUT)  # the model's JSON, not the edited content
    assert json.loads(row["chosen"])["title"] == "A red summer dress"
    assert json.loads(row["chosen"])["attributes"]["color"] == "blue"

    # Accepted later, without corrections: the verification-drop pair's chosen side is the listing as
    # the pipeline verified it (generated_content), not the merchant's edit that content now holds.
    _review(s, "pb-model", listing_id, "accepted", at=t0 + timedelta(minutes=1))
    accepted = build(s, store)
    [row] = _rows(store, accepted.uri)
    assert row["source"] == "verification_drop" and row["rejected"] == _json(MODEL_OUTPUT)
    expected = {**MODEL_OUTPUT, "attributes": {k: v for k, v in MODEL_OUTPUT["attributes"].items() if k != "neckline"}}
    assert row["chosen"] == _json(expected)


def test_a_drop_the_merchant_reverted_is_no_preference(db_session: Session, tmp_path: Path) -> None:
    s, store = db_session, LocalBlobStore(tmp_path / "datasets")
    listing_id = add_listing(s, "pb-restore", "dress-1", dropped={"neckline"})
    t0 = datetime.now(UTC) - timedelta(minutes=10)
    _review(s, "pb-restore", listing_id, "edited", {"attributes": {"neckline": "v_neck"}}, at=t0)
    assert build(s, store).status is BuildStatus.empty  # same as the model said: no change
    _review(s, "pb-restore", listing_id, "accepted", at=t0 + timedelta(minutes=1))
    result = build(s, store)
    assert result.status is BuildStatus.empty and result.dropped.get("merchant_restored") == 1


@pytest.mark.parametrize("role", [WORKER_ROLE, ADMIN_ROLE])  # beat, and enrich retrain build-pairs
def test_an_accepted_review_with_corrections_is_a_correction_pair(db_session: Session, tmp_path: Path,
                                                                  role: str) -> None:
    s, store = db_session, LocalBlobStore(tmp_path / "datasets")
    listing_id = add_listing(s, "pb-accept", "dress-1", dropped={"neckline"})
    _review(s, "pb-accept", listing_id, "accepted", {"title": "A red floral summer dress"})
    result = build(s, store, role=role)
    [row] = _rows(store, result.uri)
    assert row["source"] == "merchant_correction"
    assert json.loads(row["chosen"])["title"] == "A red floral summer dress"
    assert row["rejected"] == _json(MODEL_OUTPUT)


def test_runs_without_pairs_move_the_read_position_so_the_builder_never_starves(db_session: Session,
                                                                                tmp_path: Path) -> None:
    s, store = db_session, LocalBlobStore(tmp_path / "datasets")
    config = RetrainConfig(settle=timedelta(0), holdout_fraction=0.0, max_feedback=3)
    # Seven reviews that make no pair (accepted as generated, nothing dropped), then one edit.
    plain = [_review(s, "pb-starve", add_listing(s, "pb-starve", f"plain-{n}", dropped=frozenset()), "accepted")
             for n in range(7)]
    edited_listing = add_listing(s, "pb-starve", "edited")
    edit_id = _review(s, "pb-starve", edited_listing, "edited", {"title": "A red summer dress"})

    runs = [build(s, store, config) for _ in range(3)]
    assert [r.status for r in runs] == [BuildStatus.empty, BuildStatus.empty, BuildStatus.built]
    assert [r.watermark for r in runs] == [plain[2], plain[5], edit_id]  # three rows a run, every run moves on
    assert runs[0].dropped["no_preference"] == 3
    assert [r["listing_id"] for r in _rows(store, runs[2].uri)] == [edited_listing]
    assert _position(s) == edit_id
    dataset = s.execute(text("SELECT watermark_feedback_id FROM training_datasets WHERE id = :i"),
                        {"i": runs[2].dataset_id}).scalar_one()
    assert dataset == edit_id  # the dataset still records the last feedback id it consumed

    after = build(s, store, config)
    assert after.status is BuildStatus.empty and after.watermark == edit_id and _position(s) == edit_id


def test_the_read_position_moves_with_the_runs_transaction(db_session: Session, tmp_path: Path) -> None:
    s, store = db_session, LocalBlobStore(tmp_path / "datasets")
    before = _position(s)
    _review(s, "pb-tx", add_listing(s, "pb-tx", "plain", dropped=frozenset()), "accepted")
    savepoint = s.begin_nested()
    assert build(s, store).status is BuildStatus.empty
    assert _position(s) is not None and _position(s) != before
    savepoint.rollback()
    assert _position(s) == before  # a run that rolls back has read nothing


def test_the_read_position_starts_after_datasets_built_before_it_existed(db_session: Session,
                                                                        tmp_path: Path) -> None:
    s, store = db_session, LocalBlobStore(tmp_path / "datasets")
    consumed = _review(s, "pb-legacy", add_listing(s, "pb-legacy", "old"), "edited", {"title": "A red summer dress"})
    s.execute(text("DELETE FROM builder_watermarks WHERE builder = :b"), {"b": BUILDER})
    s.execute(text("INSERT INTO training_datasets (name, uri, content_hash, manifest, watermark_feedback_id, "
                   "window_end) VALUES ('pb-legacy', 'file:///x', repeat('0', 64), '{}', :w, now())"), {"w": consumed})
    fresh = add_listing(s, "pb-legacy", "new")
    _review(s, "pb-legacy", fresh, "edited", {"title": "A blue summer dress"})
    result = build(s, store)
    assert [r["listing_id"] for r in _rows(store, result.uri)] == [fresh]


def _json(listing: dict[str, Any]) -> str:
    from models.categories import CATEGORIES
    from tasks.feedback.datasets import listing_json

    return listing_json(CATEGORIES["dress"], listing)
