"""The promotion gate: a candidate replaces the active listing model only when it is better.

Run as ``enrich retrain promote`` runs it: the maintenance role ``enrich_admin`` (``model_versions``
is platform-level, not tenant-scoped, so no scope is set).
"""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from db.tables import ModelVersion
from tasks.feedback.promotion import PromotionError, promote
from tests.conftest import ADMIN_ROLE


def _version(s: Session, name: str, *, status: str, random_weights: bool = False, base: str | None = None,
             accuracy: float | None = None, base_accuracy: float | None = None) -> ModelVersion:
    metrics = {}
    if accuracy is not None:
        metrics = {"holdout": {"field_accuracy": accuracy}, "base_holdout": {"field_accuracy": base_accuracy}}
    row = ModelVersion(kind="vlm", name=name, revision="r1", profile="pretrained", random_weights=random_weights,
                       status=status, params={"base": base} if base else {}, metrics=metrics)
    s.add(row)
    s.flush()
    return row


@pytest.fixture
def active(admin_db_session: Session) -> ModelVersion:
    admin_db_session.query(ModelVersion).filter_by(kind="vlm", status="active").update({"status": "retired"})
    return _version(admin_db_session, "gate-active", status="active")


def test_a_better_candidate_is_promoted_and_the_active_one_retired(admin_db_session: Session,
                                                                    active: ModelVersion) -> None:
    db_session = admin_db_session
    assert db_session.execute(text("SELECT current_user")).scalar_one() == ADMIN_ROLE
    cand = _version(db_session, "gate-better", status="candidate", base="vlm:gate-active@r1", accuracy=0.8,
                    base_accuracy=0.7)
    decision = promote(db_session, cand.id, margin=0.05)
    assert decision.promoted and not decision.forced and decision.retired_version_id == active.id
    assert (cand.status, active.status) == ("active", "retired")
    assert cand.metrics["gate"]["candidate"] == 0.8 and cand.metrics["gate"]["active"] == 0.7


@pytest.mark.parametrize(("kwargs", "why"), [
    ({"accuracy": 0.72, "base_accuracy": 0.7}, "does not beat"),  # better, but not by the margin
    ({"accuracy": 0.9, "base_accuracy": 0.7, "base": "vlm:someone-else@r0"}, "active version is vlm:gate-active@r1"),
    ({"accuracy": 0.9, "base_accuracy": 0.7, "random_weights": True}, "random weights"),
    ({}, "no held-out"),
])
def test_the_gate_refuses_and_records_why(admin_db_session: Session, active: ModelVersion, kwargs: dict,
                                          why: str) -> None:
    db_session = admin_db_session
    fields = {"base": "vlm:gate-active@r1", **kwargs}
    cand = _version(db_session, f"gate-refused-{len(why)}", status="candidate", **fields)
    decision = promote(db_session, cand.id, margin=0.05)
    assert not decision.promoted and any(why in r for r in decision.reasons)
    assert (cand.status, active.status) == ("candidate", "active")  # nothing changed
    assert cand.metrics["gate"]["promoted"] is False and cand.metrics["gate"]["reasons"] == decision.reasons


def test_force_needs_a_reason_and_records_it(admin_db_session: Session, active: ModelVersion) -> None:
    db_session = admin_db_session
    cand = _version(db_session, "gate-forced", status="candidate", base="vlm:gate-active@r1", accuracy=0.1,
                    base_accuracy=0.7)
    with pytest.raises(PromotionError, match="--reason"):
        promote(db_session, cand.id, force=True)
    decision = promote(db_session, cand.id, force=True, reason="rollback drill")
    assert decision.promoted and decision.forced and cand.status == "active"
    assert cand.metrics["gate"]["reason"] == "rollback drill" and cand.metrics["gate"]["reasons"]


def test_only_candidates_of_the_vlm_kind_can_be_promoted(admin_db_session: Session, active: ModelVersion) -> None:
    with pytest.raises(PromotionError, match="not a candidate"):
        promote(admin_db_session, active.id)
    with pytest.raises(PromotionError, match="not a vlm version"):
        promote(admin_db_session, 10**9)
