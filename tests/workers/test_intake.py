"""Product-event intake handler behaviour that needs no broker."""

from __future__ import annotations

import pytest


def test_a_handler_bug_keeps_the_message_and_the_consumer_alive(monkeypatch, engine, pg_url) -> None:  # noqa: ANN001
    """An unexpected error in the product-event handler dead-letters (and keeps) that message
    instead of crashing the intake loop."""
    import uuid as _uuid

    from sqlalchemy import text

    import workers.intake as intake
    from tasks.events import product_event_payload
    from workers.settings import Settings

    monkeypatch.setattr(intake, "get_session_factory", lambda: __import__("db.engine", fromlist=["x"]).make_sessionmaker(engine))
    handlers = intake.EventHandlers(Settings(broker={"url": "redis://127.0.0.1:6379/14"}))  # not RabbitMQ: app keeps it

    def boom(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(intake, "accept_product_event", boom)
    payload = product_event_payload(tenant_id=f"t-{_uuid.uuid4().hex[:6]}", merchant_id="m", external_id="p",
                                    version=1, category="dress", image_urls=["https://cdn.example.com/x.jpg"])

    class FakeMessage:  # the kombu message surface the handler uses
        body = __import__("json").dumps(payload).encode()
        content_type = "application/json"
        delivery_info = {"routing_key": "product.created"}
        headers: dict = {}
        rejected = acked = False

        def reject(self, requeue: bool) -> None:
            self.rejected = not requeue

        def ack(self) -> None:
            self.acked = True

    msg = FakeMessage()
    handlers.on_product_event(msg)  # must not raise
    assert msg.rejected and not msg.acked
    with engine.connect() as conn:
        kept = conn.execute(text("SELECT reason, detail FROM dead_letters WHERE body = :b"), {"b": msg.body}).one()
    assert kept.reason == "internal_error" and "simulated bug" in kept.detail


class _Channel:
    """The channel surface kombu's ``Message.ack``/``reject`` use; ``broken`` as during a broker stop."""

    no_ack_consumers = None

    def __init__(self, broken: BaseException | None = None) -> None:
        self.broken = broken
        self.acked: list[int] = []
        self.rejected: list[tuple[int, bool]] = []

    def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        if self.broken is not None:
            raise self.broken
        self.acked.append(delivery_tag)

    def basic_reject(self, delivery_tag: int, requeue: bool) -> None:
        if self.broken is not None:
            raise self.broken
        self.rejected.append((delivery_tag, requeue))


def _handlers(monkeypatch, engine):  # noqa: ANN001, ANN202
    import workers.intake as intake
    from db.engine import make_sessionmaker
    from workers.settings import Settings

    monkeypatch.setattr(intake, "get_session_factory", lambda: make_sessionmaker(engine))
    monkeypatch.setattr(intake, "relay", lambda factory, publisher: None)  # the hand-off is not under test here
    return intake.EventHandlers(Settings(broker={"url": "redis://127.0.0.1:6379/14"}))


def _product_message(payload: dict, channel: _Channel, tag: int):  # noqa: ANN202
    import json

    from kombu.message import Message

    return Message(body=json.dumps(payload).encode(), delivery_tag=tag, content_type="application/json",
                   content_encoding="utf-8", delivery_info={"routing_key": "product.created"}, channel=channel)


def _rows(engine, payload: dict) -> tuple[int, int, int]:  # noqa: ANN001
    from sqlalchemy import text

    with engine.connect() as conn:
        return tuple(conn.execute(text(
            "SELECT (SELECT count(*) FROM inbox_events WHERE event_id = :e), "
            "       (SELECT count(*) FROM enrichment_jobs WHERE event_id = :e), "
            "       (SELECT count(*) FROM dead_letters WHERE body = :b)"),
            {"e": payload["event_id"], "b": __import__("json").dumps(payload).encode()}).one())


@pytest.mark.parametrize("lost", [ConnectionResetError(104, "Connection reset by peer"), BrokenPipeError(32, "Broken pipe"),
                                  "amqp"])
def test_an_ack_lost_with_the_broker_is_no_dead_letter_and_the_redelivery_is_a_no_op(lost, monkeypatch,  # noqa: ANN001
                                                                                    engine) -> None:  # noqa: ANN001
    """The transaction committed, then the broker went away before the ack: no handler crash, no
    dead letter; the connection error reaches the consumer (which reconnects), and the broker's
    redelivery of the same event is absorbed by the inbox."""
    import uuid as _uuid

    import amqp.exceptions
    from structlog.testing import capture_logs

    from tasks.events import product_event_payload

    if lost == "amqp":
        lost = amqp.exceptions.RecoverableConnectionError("connection already closed")
    handlers = _handlers(monkeypatch, engine)
    payload = product_event_payload(tenant_id=f"t-{_uuid.uuid4().hex[:6]}", merchant_id="m", external_id="p",
                                    version=1, category="dress", image_urls=["https://cdn.example.com/x.jpg"])
    with capture_logs() as logs, pytest.raises(type(lost)):
        handlers.on_product_event(_product_message(payload, _Channel(broken=lost), tag=1))
    events = [entry["event"] for entry in logs]
    assert "intake.ack_failed" in events and "intake.crashed" not in events
    assert next(e for e in logs if e["event"] == "intake.ack_failed")["log_level"] == "warning"
    assert _rows(engine, payload) == (1, 1, 0)  # committed once; nothing dead-lettered

    channel = _Channel()  # the broker is back and redelivers the unacked message
    handlers.on_product_event(_product_message(payload, channel, tag=2))
    assert channel.acked == [2] and channel.rejected == []
    assert _rows(engine, payload) == (1, 1, 0)


def test_a_handler_bug_still_dead_letters_even_when_the_reject_then_fails(monkeypatch, engine) -> None:  # noqa: ANN001
    import uuid as _uuid

    import workers.intake as intake
    from tasks.events import product_event_payload

    handlers = _handlers(monkeypatch, engine)

    def boom(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(intake, "accept_product_event", boom)
    payload = product_event_payload(tenant_id=f"t-{_uuid.uuid4().hex[:6]}", merchant_id="m", external_id="p",
                                    version=1, category="dress", image_urls=["https://cdn.example.com/x.jpg"])
    with pytest.raises(ConnectionResetError):
        handlers.on_product_event(_product_message(payload, _Channel(broken=ConnectionResetError(104, "reset")), 1))
    assert _rows(engine, payload)[2] == 1  # a real bug is a dead letter, broker or no broker
