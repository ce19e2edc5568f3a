"""Duplicate decisions repository: one current decision per pair of digests, latest by event time,
under forced row-level security as ``enrich_worker`` in the tenant's scope."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from db.enums import PairDecision
from db.repositories import duplicate_decisions as rows
from db.tables import Tenant
from tests.conftest import in_tenant

TENANT, OTHER = "acme", "globex"
A, B, C = "a" * 64, "b" * 64, "c" * 64
T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def _decision(x: str, y: str, decision: PairDecision, at: datetime, *, tenant: str = TENANT,
              event_id: uuid.UUID | None = None) -> rows.NewDecision:
    return rows.NewDecision(tenant_id=tenant, image_a_sha256=x, image_b_sha256=y, decision=decision,
                            event_id=event_id or uuid.uuid4(), occurred_at=at, merchant_id="m", reviewer="ui")


@pytest.fixture
def tenants(db_session: Session) -> None:
    db_session.add_all([Tenant(id=TENANT), Tenant(id=OTHER)])
    db_session.flush()


def test_pair_key_orders_the_digests_and_refuses_one_image_twice() -> None:
    assert rows.pair_key(B, A) == rows.pair_key(A, B) == (A, B)
    assert rows.pair_key(A.upper(), B) == (A, B)
    with pytest.raises(ValueError):
        rows.pair_key(A, A.upper())


def test_the_latest_decision_by_event_time_is_current_whatever_the_arrival_order(db_session: Session,
                                                                                 tenants: None) -> None:
    with in_tenant(db_session, TENANT):
        assert rows.record(db_session, _decision(B, A, PairDecision.not_duplicate, T0))
        later = _decision(A, B, PairDecision.confirmed, T0 + timedelta(minutes=5))
        assert rows.record(db_session, later)
        # An earlier decision delivered after the later one changes nothing.
        assert not rows.record(db_session, _decision(A, B, PairDecision.not_duplicate, T0 + timedelta(minutes=1)))
        current = rows.current(db_session, TENANT, B, A)
        assert current is not None and current.decision == "confirmed" and current.event_id == later.event_id
        assert (current.image_a_sha256, current.image_b_sha256) == (A, B)
        # The same instant: the larger event id wins, so every delivery order ends the same.
        low, high = sorted((uuid.uuid4(), uuid.uuid4()))
        same = T0 + timedelta(hours=1)
        assert rows.record(db_session, _decision(A, B, PairDecision.not_duplicate, same, event_id=high))
        assert not rows.record(db_session, _decision(A, B, PairDecision.confirmed, same, event_id=low))
        assert rows.current(db_session, TENANT, A, B).decision == "not_duplicate"
        assert db_session.execute(text("SELECT count(*) FROM duplicate_decisions")).scalar_one() == 1


def test_partners_and_the_pairs_decided_apart(db_session: Session, tenants: None) -> None:
    with in_tenant(db_session, TENANT):
        rows.record(db_session, _decision(A, B, PairDecision.not_duplicate, T0))
        rows.record(db_session, _decision(C, A, PairDecision.confirmed, T0))
        assert rows.partners(db_session, TENANT, A) == {B: PairDecision.not_duplicate, C: PairDecision.confirmed}
        assert rows.partners(db_session, TENANT, B) == {A: PairDecision.not_duplicate}
        assert rows.not_duplicate_among(db_session, TENANT, [A, B, C]) == {(A, B)}
        assert rows.not_duplicate_among(db_session, TENANT, [A, C]) == set()


def test_decisions_are_per_tenant_under_forced_rls(db_session: Session, tenants: None) -> None:
    with in_tenant(db_session, OTHER):
        rows.record(db_session, _decision(A, B, PairDecision.confirmed, T0, tenant=OTHER))
    with in_tenant(db_session, TENANT):
        assert rows.current(db_session, TENANT, A, B) is None
        assert rows.partners(db_session, TENANT, A) == {}
        assert db_session.execute(text("SELECT count(*) FROM duplicate_decisions")).scalar_one() == 0
        # The other tenant's row is invisible, so this is a new row of this tenant, not a replacement.
        assert rows.record(db_session, _decision(A, B, PairDecision.not_duplicate, T0))
        with pytest.raises(DBAPIError, match="row-level security"), db_session.begin_nested():
            rows.record(db_session, _decision(A, C, PairDecision.confirmed, T0, tenant=OTHER))
    with in_tenant(db_session, OTHER):
        assert rows.current(db_session, OTHER, A, B).decision == "confirmed"


def test_the_table_refuses_an_unordered_pair_or_an_unknown_decision(db_session: Session, tenants: None) -> None:
    insert = text("INSERT INTO duplicate_decisions (tenant_id, image_a_sha256, image_b_sha256, decision, event_id,"
                  " occurred_at, merchant_id, reviewer) VALUES ('acme', :a, :b, :d, :e, now(), 'm', 'ui')")
    with in_tenant(db_session, TENANT):
        for a, b, decision, constraint in ((B, A, "confirmed", "pair_ordered"),
                                           (A, B, "maybe", "ck_duplicate_decisions_decision")):
            with pytest.raises(IntegrityError, match=constraint), db_session.begin_nested():
                db_session.execute(insert, {"a": a, "b": b, "d": decision, "e": uuid.uuid4()})
