"""Merchant decisions on duplicates (``duplicate.reviewed``): remembered, applied to the groups, and
honoured by every later dedup pass.

Everything runs as the pipeline runs it: fetch through ``fetch_and_dedup`` and decisions through
``apply_duplicate_review``, both as ``enrich_worker`` in the tenant's scope under forced RLS; the
views are read as ``enrich_reader``. Real photos: a photo, a 70 % re-encoded copy, a cropped copy
and an unrelated photo.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import text
from sqlalchemy.orm import Session

from db.enums import InboxStatus, PairDecision
from db.tables import InboxEvent
from models.hashing import sha256_hex
from tasks.events import InvalidEvent
from tasks.pipeline.decisions import (
    DecisionOutcome,
    GroupChange,
    apply_duplicate_review,
    duplicate_review_payload,
    parse_duplicate_review,
    reject_invalid_duplicate_review,
)
from tasks.pipeline.fetch import fetch_and_dedup
from tests.conftest import READER_ROLE, as_role, in_tenant
from tests.tasks.pipeline.test_fetch_dedup import (  # noqa: F401 - stage and photos are fixtures
    TENANT,
    WatchedVerifier,
    _handoff,
    _jpeg,
    _run,
    _url,
    photos,
    stage,
)

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


@pytest.fixture
def catalog(stage, photos: dict[str, bytes], sample_photos: list[tuple[Path, str]]) -> dict[str, bytes]:  # noqa: ANN001
    """The fetch tests' photos and one more copy the fetcher serves: ``cropped``, 6 % off two edges."""
    _, fetcher = stage
    original = Image.open(sample_photos[0][0]).convert("RGB")
    w, h = original.size
    cropped = _jpeg(original.crop((w * 6 // 100, 0, w, h - h * 6 // 100)), 88)
    fetcher.photos[_url("cropped")] = cropped
    return photos | {"cropped": cropped}


def _sha(photos: dict[str, bytes], name: str) -> str:
    return sha256_hex(photos[name])


def _decide(session: Session, photos: dict[str, bytes], x: str, y: str, decision: str, at: datetime = T0,
            event_id: uuid.UUID | None = None) -> Any:
    payload = duplicate_review_payload(tenant_id=TENANT, merchant_id="m", images=[_sha(photos, x), _sha(photos, y)],
                                       decision=decision, occurred_at=at.isoformat(), event_id=event_id)
    event = parse_duplicate_review(json.dumps(payload).encode(), "application/json")
    with in_tenant(session, TENANT):
        return apply_duplicate_review(session, event)


def _groups(session: Session, photos: dict[str, bytes]) -> list[dict[str, str]]:
    """Each group as {photo name: member method}, read from ``catalog.duplicate_groups``."""
    names = {_sha(photos, n): n for n in photos}
    with in_tenant(session, TENANT, READER_ROLE):
        rows = session.execute(text("SELECT members FROM catalog.duplicate_groups WHERE tenant_id = :t"
                                    " ORDER BY group_id"), {"t": TENANT}).scalars().all()
    return [{names[m["sha256"]]: m["method"] for m in members} for members in rows]


def _together(session: Session, photos: dict[str, bytes], x: str, y: str) -> bool:
    return any({x, y} <= set(g) for g in _groups(session, photos))


def test_a_split_group_never_comes_back(db_session: Session, stage, catalog: dict[str, bytes]) -> None:  # noqa: ANN001
    runtime, _ = stage
    _run(db_session, runtime, "orig", ["photo"])
    _run(db_session, runtime, "reupload", ["reupload"])
    assert _groups(db_session, catalog) == [{"photo": "near", "reupload": "near"}]

    result = _decide(db_session, catalog, "reupload", "photo", "not_duplicate")
    assert (result.outcome, result.change) == (DecisionOutcome.applied, GroupChange.split)
    assert _groups(db_session, catalog) == []  # the representative alone is no group

    # A third copy matches both; it may join one of them, never bring the two back together.
    cropped = _run(db_session, runtime, "cropped", ["cropped"])
    assert [d.kind for d in _handoff(db_session, cropped).duplicates] == ["near"]
    assert len(_groups(db_session, catalog)) == 1 and not _together(db_session, catalog, "photo", "reupload")
    # More products with the same images (reprocessing, re-listings) leave the split alone.
    _run(db_session, runtime, "relisted", ["reupload", "photo", "cropped"])
    assert not _together(db_session, catalog, "photo", "reupload")


def test_a_pair_decided_apart_before_it_was_uploaded_is_never_grouped(db_session: Session, stage,  # noqa: ANN001
                                                                        catalog: dict[str, bytes]) -> None:
    runtime, _ = stage
    result = _decide(db_session, catalog, "photo", "reupload", "not_duplicate")
    assert (result.outcome, result.change) == (DecisionOutcome.applied, GroupChange.pending)
    _run(db_session, runtime, "orig", ["photo"])
    job = _run(db_session, runtime, "reupload", ["reupload"])
    assert _handoff(db_session, job).duplicates == ()  # verification would confirm it: not even tried
    assert _groups(db_session, catalog) == []


def test_a_decision_that_arrives_while_the_copy_is_verified_still_counts(db_session: Session, stage,  # noqa: ANN001
                                                                          catalog: dict[str, bytes]) -> None:
    """Verification runs with no transaction open; the decision commits meanwhile. The last fetch
    transaction reads the decisions under the groups lock, so the copy is not grouped."""
    runtime, _ = stage
    _run(db_session, runtime, "orig", ["photo"])
    decided: list[Any] = []
    runtime._verifier = WatchedVerifier(  # type: ignore[assignment]
        lambda image_id: decided or decided.append(_decide(db_session, catalog, "photo", "reupload", "not_duplicate")))
    job = _run(db_session, runtime, "reupload", ["reupload"])
    assert decided and decided[0].change is GroupChange.unchanged  # stored, not grouped yet
    assert runtime._verifier.matched  # type: ignore[union-attr]  # verified, and confirmed by geometry
    assert _handoff(db_session, job).duplicates == () and _groups(db_session, catalog) == []


def test_a_confirmed_pair_is_grouped_though_verification_refuses_it(db_session: Session, stage,  # noqa: ANN001
                                                                     catalog: dict[str, bytes]) -> None:
    runtime, _ = stage
    _decide(db_session, catalog, "photo", "other", "confirmed")
    _run(db_session, runtime, "orig", ["photo"])
    job = _run(db_session, runtime, "unrelated", ["other"])
    assert _handoff(db_session, job).duplicates == ()  # verification refused it; the merchant did not
    assert _groups(db_session, catalog) == [{"photo": "confirmed", "other": "confirmed"}]
    with in_tenant(db_session, TENANT, READER_ROLE):
        row = db_session.execute(text("SELECT members, decisions FROM catalog.duplicate_groups")).one()
    assert {m["decision"] for m in row.members} == {None, "confirmed"}  # the representative has no pair
    assert [(d["decision"], d["reviewer"]) for d in row.decisions] == [("confirmed", "merchant-ui")]


def test_later_decisions_replace_earlier_ones_by_event_time(db_session: Session, stage,  # noqa: ANN001
                                                             catalog: dict[str, bytes]) -> None:
    runtime, _ = stage
    _run(db_session, runtime, "orig", ["photo"])
    _run(db_session, runtime, "reupload", ["reupload"])
    _run(db_session, runtime, "unrelated", ["other"])
    merged = _decide(db_session, catalog, "other", "reupload", "confirmed", T0)
    assert merged.change is GroupChange.grouped
    assert _groups(db_session, catalog) == [{"photo": "near", "reupload": "near", "other": "confirmed"}]

    event_id = uuid.uuid4()
    split = _decide(db_session, catalog, "photo", "other", "not_duplicate", T0 + timedelta(hours=1), event_id)
    assert split.change is GroupChange.split
    assert _groups(db_session, catalog) == [{"photo": "near", "reupload": "near"}]
    # The replay is a no-op; an older decision for the same pair arriving late changes nothing.
    replay = _decide(db_session, catalog, "photo", "other", "not_duplicate", T0 + timedelta(hours=1), event_id)
    assert replay.outcome is DecisionOutcome.duplicate
    stale = _decide(db_session, catalog, "other", "photo", "confirmed", T0 + timedelta(minutes=30))
    assert stale.outcome is DecisionOutcome.stale
    with as_role(db_session, None):
        assert db_session.get(InboxEvent, stale.event_id).status == InboxStatus.stale.value
    # A confirmation that would put a pair decided apart in one group is refused: not_duplicate wins.
    blocked = _decide(db_session, catalog, "reupload", "other", "confirmed", T0 + timedelta(hours=2))
    assert blocked.change is GroupChange.blocked
    assert not _together(db_session, catalog, "photo", "other")

    with in_tenant(db_session, TENANT, READER_ROLE):
        decided = db_session.execute(text(
            "SELECT image_a_sha256, image_b_sha256, decision, same_group, image_a_products, image_b_products"
            " FROM catalog.duplicate_decisions ORDER BY occurred_at")).all()
    names = {_sha(catalog, n): n for n in catalog}
    assert [({names[r.image_a_sha256], names[r.image_b_sha256]}, r.decision, r.same_group) for r in decided] == [
        ({"photo", "other"}, "not_duplicate", False), ({"reupload", "other"}, "confirmed", False)]
    products = {names[r.image_a_sha256]: r.image_a_products for r in decided} | {
        names[r.image_b_sha256]: r.image_b_products for r in decided}
    assert products == {"photo": ["orig"], "reupload": ["reupload"], "other": ["unrelated"]}


def test_confirming_across_groups_merges_them(db_session: Session, stage, catalog: dict[str, bytes]) -> None:  # noqa: ANN001
    runtime, _ = stage
    _decide(db_session, catalog, "cropped", "other", "confirmed")  # waits for both images
    _run(db_session, runtime, "orig", ["photo"])
    _run(db_session, runtime, "reupload", ["reupload"])
    _run(db_session, runtime, "unrelated", ["other"])
    _decide(db_session, catalog, "photo", "cropped", "not_duplicate")
    _run(db_session, runtime, "cropped", ["cropped"])  # matches photo/reupload, which it may not join
    assert _groups(db_session, catalog) == [{"photo": "near", "reupload": "near"}, {"other": "confirmed",
                                                                                   "cropped": "confirmed"}]
    # Merging brings the other group's members along, except one decided apart from the target group.
    assert _decide(db_session, catalog, "reupload", "other", "confirmed").change is GroupChange.grouped
    assert _groups(db_session, catalog) == [{"photo": "near", "reupload": "near", "other": "confirmed"}]


def test_parsing_refuses_what_the_contract_refuses(db_session: Session) -> None:
    good = duplicate_review_payload(tenant_id=TENANT, merchant_id="m", images=["b" * 64, "a" * 64],
                                    decision="not_duplicate", reason="two different shirts")
    event = parse_duplicate_review(json.dumps(good).encode(), "application/json")
    assert (event.image_a_sha256, event.image_b_sha256, event.decision) == ("a" * 64, "b" * 64,
                                                                             PairDecision.not_duplicate)
    for change, where in (({"images": ["a" * 64, "a" * 64]}, "$.images"), ({"images": ["A" * 64, "b" * 64]}, "$.images[0]"),
                          ({"images": ["a" * 64]}, "$.images"), ({"decision": "maybe"}, "$.decision"),
                          ({"tenant_id": ""}, "$.tenant_id")):
        with pytest.raises(InvalidEvent) as caught:
            parse_duplicate_review(json.dumps(good | change).encode(), "application/json")
        assert caught.value.detail.startswith(where) and caught.value.event_id == uuid.UUID(good["event_id"])
    with pytest.raises(InvalidEvent, match="content type"):
        parse_duplicate_review(b"\x80\x04K\x01.", "application/x-python-serialize")

    fallback = uuid.uuid4()
    try:
        parse_duplicate_review(b"not json", "application/json")
    except InvalidEvent as exc:
        with as_role(db_session, None):  # the system scope of the intake: tenant unknown
            first = reject_invalid_duplicate_review(db_session, exc, fallback)
            again = reject_invalid_duplicate_review(db_session, exc, fallback)
            row = db_session.get(InboxEvent, fallback)
    assert (first.outcome, again.outcome) == (DecisionOutcome.rejected, DecisionOutcome.duplicate)
    assert row.status == InboxStatus.rejected.value and row.detail.startswith("invalid_event")
