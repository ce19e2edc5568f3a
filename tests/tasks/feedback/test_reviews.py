"""Merchant reviews: validation, idempotent application, field-level errors, refusals, the status report."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from db.repositories.reports import feedback_report
from db.tables import FieldError, InboxEvent, Listing, ReviewFeedback
from tasks.events import InvalidEvent
from tasks.feedback.reviews import (
    ReviewCode,
    ReviewOutcome,
    apply_review,
    parse_review_event,
    reject_invalid_review,
    review_event_payload,
)

JSON = "application/json"

MODEL_OUTPUT: dict[str, Any] = {
    "title": "Red floral summer dress",
    "description": "A knee-length red dress with a floral print and short sleeves.",
    "attributes": {"color": "red", "pattern": "floral", "sleeve_length": "short", "length": "knee",
                   "neckline": "v_neck"},
}


def verified_content(output: dict[str, Any], dropped: set[str]) -> dict[str, Any]:
    attrs = {k: {"value": v, "confidence": 0.9, "source": "image"} for k, v in output["attributes"].items()
             if k not in dropped}
    return {"title": output["title"], "description": output["description"], "attributes": attrs}


def add_listing(session: Session, tenant: str, external_id: str, *, merchant: str = "m1", category: str = "dress",
                model_output: dict[str, Any] | None = None, model_input: dict[str, Any] | None = None,
                dropped: set[str] = frozenset({"neckline"}), storage_uri: str | None = None,
                vlm_id: int | None = None) -> int:
    """Tenant, merchant, product, image, vlm version (when not given) and one listing; returns its id."""
    output = model_output or MODEL_OUTPUT
    session.execute(text("INSERT INTO tenants (id) VALUES (:t) ON CONFLICT DO NOTHING"), {"t": tenant})
    session.execute(text("INSERT INTO merchants (tenant_id, id) VALUES (:t, :m) ON CONFLICT DO NOTHING"),
                    {"t": tenant, "m": merchant})
    if vlm_id is None:
        vlm_id = session.execute(text(
            "INSERT INTO model_versions (kind, name, revision, profile, random_weights, status) "
            "VALUES ('vlm', 'tiny-vlm', 'random-seed0', 'tiny', true, 'candidate') "
            "ON CONFLICT (kind, name, revision) DO UPDATE SET profile = EXCLUDED.profile RETURNING id")).scalar_one()
    product_id = session.execute(text(
        "INSERT INTO products (tenant_id, merchant_id, external_id, version, category, title) "
        "VALUES (:t, :m, :e, 1, :c, 'Merchant title') RETURNING id"),
        {"t": tenant, "m": merchant, "e": external_id, "c": category}).scalar_one()
    sha = hashlib.sha256(f"{tenant}/{external_id}/{storage_uri}".encode()).hexdigest()
    image_id = session.execute(text(
        "INSERT INTO images (tenant_id, sha256, phash, dhash, width, height, byte_size, format, storage_uri) "
        "VALUES (:t, :s, B'0000000000000000000000000000000000000000000000000000000000000000', "
        "B'0000000000000000000000000000000000000000000000000000000000000000', 64, 64, 100, 'JPEG', :u) "
        "ON CONFLICT (tenant_id, sha256) DO UPDATE SET width = 64 RETURNING id"),
        {"t": tenant, "s": sha, "u": storage_uri or f"file:///originals/{sha}"}).scalar_one()
    content = verified_content(output, set(dropped))
    dropped_doc = {k: {"value": output["attributes"][k], "reason": "below_margin", "clip_value": None,
                       "confidence": 0.3} for k in dropped if k in output["attributes"]}
    model_input = model_input or {"prompt_text": f"<|im_start|>User:<image> describe {external_id}",
                                  "schema_id": f"{category}@1", "locale": "en",
                                  "merchant_data": {"title": "Merchant title", "description": "", "attributes": {}}}
    return int(session.execute(text(
        "INSERT INTO listings (tenant_id, product_id, product_version, model_version_id, image_id, category, "
        "schema_id, content, dropped_attributes, model_output, model_input, model_versions, random_weights) "
        "VALUES (:t, :p, 1, :mv, :i, :c, :sid, CAST(:content AS jsonb), CAST(:dropped AS jsonb), "
        "CAST(:out AS jsonb), CAST(:inp AS jsonb), CAST(:mvs AS jsonb), true) RETURNING id"),
        {"t": tenant, "p": product_id, "mv": vlm_id, "i": image_id, "c": category, "sid": f"{category}@1",
         "content": json.dumps(content), "dropped": json.dumps(dropped_doc), "out": json.dumps(output),
         "inp": json.dumps(model_input), "mvs": json.dumps({"vlm": vlm_id, "detector": 0, "clip": 0})},
    ).scalar_one())


def review(session: Session, payload: dict[str, Any]):  # noqa: ANN201
    return apply_review(session, parse_review_event(json.dumps(payload).encode(), JSON))


def test_review_applied_idempotently_with_field_errors(db_session: Session) -> None:
    s = db_session
    listing_id = add_listing(s, "fb-acme", "dress-1")
    payload = review_event_payload(tenant_id="fb-acme", merchant_id="m1", listing_id=listing_id, decision="edited",
                                   corrected={"title": "Red floral midi dress",
                                              "attributes": {"color": "red", "length": "midi", "material": "silk"}})
    first = review(s, payload)
    second = review(s, payload)

    assert first.outcome is ReviewOutcome.applied and first.field_errors == 3
    assert second.outcome is ReviewOutcome.duplicate and second.feedback_id == first.feedback_id
    assert s.scalar(select(func.count()).select_from(ReviewFeedback).where(
        ReviewFeedback.event_id == uuid.UUID(payload["event_id"]))) == 1
    listing = s.get(Listing, listing_id)
    assert listing is not None and listing.status == "edited" and listing.reviewed_at is not None
    errors = {e.field: e for e in s.scalars(select(FieldError).where(FieldError.feedback_id == first.feedback_id))}
    assert set(errors) == {"title", "attributes.length", "attributes.material"}  # unchanged color is no error
    assert errors["title"].model_value == MODEL_OUTPUT["title"]
    assert errors["title"].merchant_value == "Red floral midi dress"
    assert (errors["attributes.length"].model_value, errors["attributes.length"].merchant_value) == ("knee", "midi")
    assert errors["attributes.material"].model_value is None
    assert errors["title"].category == "dress" and "vlm" in errors["title"].model_versions


def test_status_follows_the_most_recent_review(db_session: Session) -> None:
    s = db_session
    listing_id = add_listing(s, "fb-order", "dress-1")
    newer = review_event_payload(tenant_id="fb-order", merchant_id="m1", listing_id=listing_id, decision="accepted")
    older = review_event_payload(tenant_id="fb-order", merchant_id="m1", listing_id=listing_id, decision="rejected",
                                 reason="wrong product")
    older["occurred_at"] = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    assert review(s, newer).outcome is ReviewOutcome.applied
    assert review(s, older).outcome is ReviewOutcome.applied  # logged, but does not overwrite the newer decision
    listing = s.get(Listing, listing_id)
    assert listing is not None and listing.status == "accepted"


def test_unknown_listing_and_cross_tenant_review_are_rejected(db_session: Session) -> None:
    s = db_session
    theirs = add_listing(s, "fb-victim", "secret-dress")
    unknown = review(s, review_event_payload(tenant_id="fb-attacker", merchant_id="m1", listing_id=999_999_999,
                                             decision="accepted"))
    cross = review_event_payload(tenant_id="fb-attacker", merchant_id="m1", listing_id=theirs, decision="edited",
                                 corrected={"title": "Overwritten by another tenant"})
    result = review(s, cross)

    assert unknown.code is ReviewCode.unknown_listing and unknown.outcome is ReviewOutcome.rejected
    assert result.outcome is ReviewOutcome.rejected and result.code is ReviewCode.tenant_mismatch
    assert "fb-victim" not in result.detail and "secret" not in result.detail
    listing = s.get(Listing, theirs)
    assert listing is not None and listing.status == "proposed"
    assert s.scalar(select(func.count()).select_from(ReviewFeedback).where(ReviewFeedback.listing_id == theirs)) == 0
    inbox = s.get(InboxEvent, uuid.UUID(cross["event_id"]))
    assert inbox is not None and inbox.status == "rejected" and inbox.detail.startswith("tenant_mismatch")
    assert review(s, cross).outcome is ReviewOutcome.duplicate  # redelivery of a refused review is a no-op


def test_other_merchants_listing_is_rejected(db_session: Session) -> None:
    s = db_session
    listing_id = add_listing(s, "fb-shop", "dress-1", merchant="m1")
    result = review(s, review_event_payload(tenant_id="fb-shop", merchant_id="m2", listing_id=listing_id,
                                            decision="rejected"))
    assert result.code is ReviewCode.merchant_mismatch


def test_invalid_review_is_refused_and_recorded(db_session: Session) -> None:
    s = db_session
    bad = review_event_payload(tenant_id="fb-x", merchant_id="m1", listing_id=1, decision="accepted")
    bad["decision"] = "edited"  # edited without corrected fields
    with pytest.raises(InvalidEvent) as caught:
        parse_review_event(json.dumps(bad).encode(), JSON)
    assert caught.value.event_id == uuid.UUID(bad["event_id"])
    result = reject_invalid_review(s, caught.value, uuid.uuid4())
    assert result.code is ReviewCode.invalid_event
    with pytest.raises(InvalidEvent):
        parse_review_event(b"\x80\x04pickle", "application/x-python-serialize")


def test_feedback_report(db_session: Session) -> None:
    s = db_session
    a = add_listing(s, "fb-report", "d1")
    b = add_listing(s, "fb-report", "d2")
    review(s, review_event_payload(tenant_id="fb-report", merchant_id="m1", listing_id=a, decision="edited",
                                   corrected={"attributes": {"color": "blue"}}))
    review(s, review_event_payload(tenant_id="fb-report", merchant_id="m1", listing_id=b, decision="accepted"))
    report = feedback_report(s)
    assert report["by_decision"]["edited"] >= 1 and report["by_decision"]["accepted"] >= 1
    assert report["error_rate_by_field"]["attributes.color"] > 0
    assert 0 < report["error_rate_by_category"]["dress"] <= 1
    assert isinstance(report["last_datasets"], list)
