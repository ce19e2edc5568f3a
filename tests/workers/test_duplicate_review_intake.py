"""``duplicate.reviewed`` through the real intake handler (no broker): routed from the review-events
queue by its routing key, applied once as ``enrich_worker`` under forced RLS, invalid ones kept."""

from __future__ import annotations

import json
import uuid

import pytest
from kombu.message import Message
from sqlalchemy import text

from tasks.pipeline.decisions import duplicate_review_payload
from workers.settings import Settings
from workers.topology import build_topology


class _Channel:
    no_ack_consumers = None

    def __init__(self) -> None:
        self.acked: list[int] = []
        self.rejected: list[tuple[int, bool]] = []

    def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self.acked.append(delivery_tag)

    def basic_reject(self, delivery_tag: int, requeue: bool) -> None:
        self.rejected.append((delivery_tag, requeue))


def _message(body: bytes, channel: _Channel, tag: int, routing_key: str = "duplicate.reviewed") -> Message:
    return Message(body=body, delivery_tag=tag, content_type="application/json", content_encoding="utf-8",
                   delivery_info={"routing_key": routing_key}, channel=channel)


@pytest.fixture
def handlers(monkeypatch: pytest.MonkeyPatch, worker_engine):  # noqa: ANN001, ANN201
    import workers.intake as intake
    from db.engine import make_sessionmaker

    monkeypatch.setattr(intake, "get_session_factory", lambda: make_sessionmaker(worker_engine))
    return intake.EventHandlers(Settings(broker={"url": "redis://127.0.0.1:6379/14"}))  # not RabbitMQ: app keeps it


def test_the_review_queue_is_bound_to_duplicate_reviews() -> None:
    topo = build_topology(Settings(), rabbitmq=True)
    assert {b.routing_key for b in topo.review_events.bindings} == {"listing.reviewed", "duplicate.reviewed"}


def test_a_decision_is_applied_once_and_a_bad_one_is_kept(handlers, engine) -> None:  # noqa: ANN001
    tenant = f"dr-{uuid.uuid4().hex[:8]}"
    payload = duplicate_review_payload(tenant_id=tenant, merchant_id="m1", images=["e" * 64, "d" * 64],
                                       decision="not_duplicate", reason="two different shirts")
    channel = _Channel()
    handlers.on_review_event(_message(json.dumps(payload).encode(), channel, 1))
    handlers.on_review_event(_message(json.dumps(payload).encode(), channel, 2))  # a redelivery
    bad = json.dumps(payload | {"event_id": str(uuid.uuid4()), "decision": "perhaps"}).encode()
    handlers.on_review_event(_message(bad, channel, 3))
    assert channel.acked == [1, 2] and channel.rejected == [(3, False)]
    try:
        with engine.connect() as conn:
            row = conn.execute(text("SELECT image_a_sha256, image_b_sha256, decision, reason FROM duplicate_decisions"
                                    " WHERE tenant_id = :t"), {"t": tenant}).one()
            inbox = conn.execute(text("SELECT status FROM inbox_events WHERE tenant_id = :t ORDER BY received_at"),
                                 {"t": tenant}).scalars().all()
            kept = conn.execute(text("SELECT reason FROM dead_letters WHERE body = :b"), {"b": bad}).scalar_one()
        assert tuple(row) == ("d" * 64, "e" * 64, "not_duplicate", "two different shirts")
        assert inbox == ["accepted", "rejected"] and kept == "invalid_event"
    finally:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM dead_letters WHERE body = :b"), {"b": bad})
            for table in ("duplicate_decisions", "inbox_events", "merchants"):
                conn.execute(text(f"DELETE FROM {table} WHERE tenant_id = :t"), {"t": tenant})
            conn.execute(text("DELETE FROM tenants WHERE id = :t"), {"t": tenant})
