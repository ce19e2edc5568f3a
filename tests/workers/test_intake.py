"""Product-event intake handler behaviour that needs no broker."""

from __future__ import annotations


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
