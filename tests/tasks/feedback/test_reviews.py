"""Merchant reviews: validation, idempotent application, field-level errors, refusals, the status report.

Listings are seeded as the superuser test connection; reviews are applied as the intake applies
them (``workers.intake.on_review_event``): ``enrich_worker`` under forced row-level security, in a
tenant session of the event's tenant. Invalid reviews are recorded in the system scope (their
tenant may be unknown), the report is read as ``enrich status`` reads it (``enrich_admin``, system
scope) and the catalog view as an analyst (``enrich_reader``) reads it.
"""

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
from tests.conftest import ADMIN_ROLE, READER_ROLE, in_system_scope, in_tenant
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
    """Apply one review as the intake does: ``enrich_worker``, scoped to the event's tenant."""
    event = parse_review_event(json.dumps(payload).encode(), JSON)
    with in_tenant(session, event.tenant_id):
        return apply_review(session, event)


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
    # The attacker's tenant session does not see the other tenant's listing at all (row-level
    # security): refused exactly as a listing that does not exist.
    assert result.outcome is ReviewOutcome.rejected and result.code is ReviewCode.unknown_listing
    assert "fb-victim" not in result.detail and "secret" not in result.detail
    listing = s.get(Listing, theirs)
    assert listing is not None and listing.status == "proposed"
    assert s.scalar(select(func.count()).select_from(ReviewFeedback).where(ReviewFeedback.listing_id == theirs)) == 0
    inbox = s.get(InboxEvent, uuid.UUID(cross["event_id"]))
    assert inbox is not None and inbox.status == "rejected" and inbox.detail.startswith("unknown_listing")
    assert inbox.tenant_id == "fb-attacker"
    assert review(s, cross).outcome is ReviewOutcome.duplicate  # redelivery of a refused review is a no-op


def test_cross_tenant_review_is_refused_by_name_where_row_level_security_is_bypassed(db_session: Session) -> None:
    # Superuser on purpose: apply_review's own tenant check is reached only by a connection that
    # bypasses row-level security (a superuser or BYPASSRLS login, ENRICH_DB__RUNTIME_ROLE empty).
    s = db_session
    theirs = add_listing(s, "fb-victim", "secret-dress")
    cross = review_event_payload(tenant_id="fb-attacker", merchant_id="m1", listing_id=theirs, decision="edited",
                                 corrected={"title": "Overwritten by another tenant"})
    event = parse_review_event(json.dumps(cross).encode(), JSON)
    result = apply_review(s, event)

    assert result.outcome is ReviewOutcome.rejected and result.code is ReviewCode.tenant_mismatch
    assert "fb-victim" not in result.detail and "secret" not in result.detail
    listing = s.get(Listing, theirs)
    assert listing is not None and listing.status == "proposed"
    assert s.scalar(select(func.count()).select_from(ReviewFeedback).where(ReviewFeedback.listing_id == theirs)) == 0
    inbox = s.get(InboxEvent, uuid.UUID(cross["event_id"]))
    assert inbox is not None and inbox.status == "rejected" and inbox.detail.startswith("tenant_mismatch")
    assert apply_review(s, event).outcome is ReviewOutcome.duplicate  # redelivery of a refused review is a no-op


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
    with in_system_scope(s):  # the intake's system_session: an invalid event's tenant may be unknown
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
    with in_system_scope(s, ADMIN_ROLE):  # enrich status: admin_session
        report = feedback_report(s)
    assert report["by_decision"]["edited"] >= 1 and report["by_decision"]["accepted"] >= 1
    assert report["error_rate_by_field"]["attributes.color"] > 0
    assert 0 < report["error_rate_by_category"]["dress"] <= 1
    assert isinstance(report["last_datasets"], list)


# --- merchant edits: the corrected listing is what the catalog serves ------------------------------------


def _edit(s: Session, tenant: str, listing_id: int, corrected: dict[str, Any], *, decision: str = "edited",
          at: datetime | None = None):  # noqa: ANN202
    payload = review_event_payload(tenant_id=tenant, merchant_id="m1", listing_id=listing_id, decision=decision,
                                   corrected=corrected)
    if at is not None:
        payload["occurred_at"] = at.isoformat()
    return review(s, payload)


def _listing(s: Session, listing_id: int) -> Listing:
    s.expire_all()
    listing = s.get(Listing, listing_id)
    assert listing is not None
    return listing


def test_edit_replaces_content_and_keeps_the_generated_listing_once(db_session: Session) -> None:
    from models.verify import SOURCE_MERCHANT

    s = db_session
    listing_id = add_listing(s, "ed-once", "dress-1")
    generated = _listing(s, listing_id).content
    t0 = datetime.now(UTC) - timedelta(minutes=10)
    first = _edit(s, "ed-once", listing_id, {"title": "Red floral midi dress",
                                             "attributes": {"length": "midi", "material": "silk"}}, at=t0)
    listing = _listing(s, listing_id)
    assert first.content_edited and not first.refused
    assert listing.status == "edited" and listing.generated_content == generated
    assert listing.content["title"] == "Red floral midi dress"
    assert listing.content["description"] == MODEL_OUTPUT["description"]  # not corrected: as generated
    merchant = {"value": "midi", "confidence": 1.0, "source": SOURCE_MERCHANT}  # the pipeline's merchant shape
    assert listing.content["attributes"]["length"] == merchant
    assert listing.content["attributes"]["material"] == {**merchant, "value": "silk"}
    assert listing.content["attributes"]["color"] == generated["attributes"]["color"]  # untouched, source image

    second = _edit(s, "ed-once", listing_id, {"title": "Scarlet floral midi dress", "attributes": {"color": "pink"}},
                   at=t0 + timedelta(minutes=1))
    listing = _listing(s, listing_id)
    assert second.content_edited
    assert listing.generated_content == generated  # written by the first edit only
    assert listing.content["title"] == "Scarlet floral midi dress"
    assert listing.content["attributes"]["color"]["value"] == "pink"
    assert listing.content["attributes"]["length"]["value"] == "midi"  # the earlier edit of another field stays
    errors = {e.field: e for e in s.scalars(select(FieldError).where(FieldError.feedback_id == second.feedback_id))}
    # Compared with what the model generated, not with the merchant's first edit.
    assert (errors["title"].model_value, errors["title"].merchant_value) == (MODEL_OUTPUT["title"],
                                                                             "Scarlet floral midi dress")
    assert errors["attributes.color"].model_value == "red"


@pytest.mark.parametrize("newest_first", [True, False])
def test_out_of_order_edits_end_as_the_newest_review_says(db_session: Session, newest_first: bool) -> None:
    s = db_session
    tenant = f"ed-order-{int(newest_first)}"
    listing_id = add_listing(s, tenant, "dress-1")
    t0 = datetime.now(UTC) - timedelta(hours=1)
    older = ({"title": "Older merchant title", "attributes": {"color": "blue"}}, t0)
    newer = ({"title": "Newer merchant title", "attributes": {"pattern": "striped"}}, t0 + timedelta(minutes=5))
    results = [_edit(s, tenant, listing_id, corrected, at=at)
               for corrected, at in ((newer, older) if newest_first else (older, newer))]
    listing = _listing(s, listing_id)
    assert listing.content["title"] == "Newer merchant title" and listing.reviewed_at == newer[1]
    assert listing.content["attributes"]["pattern"]["value"] == "striped"
    assert listing.generated_content is not None and listing.generated_content["title"] == MODEL_OUTPUT["title"]
    if newest_first:  # the late, older edit is recorded but writes nothing into the listing
        assert not results[1].content_edited and results[1].feedback_id is not None
        assert listing.content["attributes"]["color"]["value"] == "red"
    else:
        assert all(r.content_edited for r in results)


def test_rejection_after_an_edit_does_not_restore_the_generated_text(db_session: Session) -> None:
    s = db_session
    listing_id = add_listing(s, "ed-reject", "dress-1")
    t0 = datetime.now(UTC) - timedelta(minutes=5)
    _edit(s, "ed-reject", listing_id, {"title": "Red floral midi dress"}, at=t0)
    rejected = _edit(s, "ed-reject", listing_id, {"title": "Should not be served"}, decision="rejected",
                     at=t0 + timedelta(minutes=1))
    listing = _listing(s, listing_id)
    assert listing.status == "rejected" and not rejected.content_edited
    assert listing.content["title"] == "Red floral midi dress"
    assert listing.generated_content is not None and listing.generated_content["title"] == MODEL_OUTPUT["title"]


def test_accepted_review_with_corrections_edits_the_content(db_session: Session) -> None:
    s = db_session
    listing_id = add_listing(s, "ed-accept", "dress-1")
    result = _edit(s, "ed-accept", listing_id, {"description": "A red floral dress, knee length, short sleeves."},
                   decision="accepted")
    listing = _listing(s, listing_id)
    assert result.content_edited and listing.status == "accepted"
    assert listing.content["description"] == "A red floral dress, knee length, short sleeves."
    assert listing.generated_content is not None
    assert listing.generated_content["description"] == MODEL_OUTPUT["description"]
    plain = _edit(s, "ed-accept", listing_id, {}, decision="accepted")  # accepting what is shown changes nothing
    assert not plain.content_edited
    assert _listing(s, listing_id).content["description"] == "A red floral dress, knee length, short sleeves."


def test_values_the_listing_schema_refuses_are_reported_not_served(db_session: Session) -> None:
    s = db_session
    listing_id = add_listing(s, "ed-invalid", "dress-1")
    corrected = {"title": "Teal floral dress",
                 "attributes": {"color": "teal", "sparkle": "lots", "length": "midi", "size": 38}}
    result = _edit(s, "ed-invalid", listing_id, corrected)
    listing = _listing(s, listing_id)
    assert result.outcome is ReviewOutcome.applied and result.content_edited
    assert set(result.refused) == {"attributes.color", "attributes.sparkle"}
    assert "teal" in result.refused["attributes.color"] and "dress@1" in result.refused["attributes.color"]
    assert listing.content["title"] == "Teal floral dress"  # text is the merchant's, as given
    assert listing.content["attributes"]["color"]["value"] == "red"  # refused: stays as generated
    assert "sparkle" not in listing.content["attributes"]
    assert listing.content["attributes"]["length"]["value"] == "midi"
    assert listing.content["attributes"]["size"]["value"] == 38  # merchant-only: free values
    inbox = s.get(InboxEvent, result.event_id)
    assert inbox is not None and inbox.status == "accepted" and "attributes.color" in inbox.detail
    feedback = s.get(ReviewFeedback, result.feedback_id)
    assert feedback is not None and feedback.corrected == corrected  # what the merchant said is kept whole
    errors = {e.field: e.merchant_value for e in
              s.scalars(select(FieldError).where(FieldError.feedback_id == result.feedback_id))}
    assert errors["attributes.color"] == "teal"

    other = add_listing(s, "ed-invalid", "dress-2")
    nothing = _edit(s, "ed-invalid", other, {"attributes": {"color": "teal"}})
    listing = _listing(s, other)
    assert not nothing.content_edited and listing.generated_content is None and listing.status == "edited"


def test_current_listings_view_serves_the_edit(db_session: Session) -> None:
    s = db_session
    listing_id = add_listing(s, "ed-view", "dress-1")
    _edit(s, "ed-view", listing_id, {"title": "Red floral midi dress", "description": "Merchant's own words here.",
                                     "attributes": {"length": "midi"}})
    with in_tenant(s, "ed-view", READER_ROLE):  # an analyst: SET enrich.tenant_id, then the view
        row = s.execute(text("SELECT listing_id, status, title, description, attributes, content "
                             "FROM catalog.current_listings WHERE tenant_id = 'ed-view'")).one()
    assert (row.listing_id, row.status) == (listing_id, "edited")
    assert (row.title, row.description) == ("Red floral midi dress", "Merchant's own words here.")
    assert row.attributes["length"] == {"value": "midi", "confidence": 1.0, "source": "merchant"}
    assert row.content["title"] == row.title
