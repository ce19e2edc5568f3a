"""End to end on a real RabbitMQ: raw JSON reviews published with pika, consumed by the real intake."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from tasks.feedback.reviews import review_event_payload
from tests.tasks.feedback.test_reviews import MODEL_OUTPUT, add_listing

AMQP = "amqp://guest:guest@127.0.0.1:5672//"


def _rabbit_up() -> bool:
    try:
        pika.BlockingConnection(pika.URLParameters(AMQP.rstrip("/") + "/%2F")).close()
        return True
    except Exception:  # noqa: BLE001
        return False


pytestmark = pytest.mark.skipif(not _rabbit_up(), reason="RabbitMQ is not running on 127.0.0.1:5672")


@pytest.fixture
def intake_settings(pg_url: str, data_dir, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:  # noqa: ANN001
    from workers.database import reset_engine
    from workers.settings import get_settings, reset_settings_cache

    monkeypatch.setenv("ENRICH_BROKER__URL", AMQP)
    monkeypatch.setenv("ENRICH_BROKER__NAMESPACE", f"t{uuid.uuid4().hex[:12]}")
    monkeypatch.setenv("ENRICH_DB__URL", pg_url)
    monkeypatch.setenv("ENRICH_DB__RUNTIME_ROLE", "enrich_worker")  # as production: forced RLS applies
    reset_settings_cache()
    reset_engine()
    yield get_settings()
    reset_engine()
    reset_settings_cache()


def _wait_for(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def test_reviews_published_as_raw_json_are_applied_once(intake_settings, engine) -> None:  # noqa: ANN001
    from workers.intake import StandaloneIntake
    from workers.topology import build_topology, declare

    topo = build_topology(intake_settings, rabbitmq=True)
    factory = sessionmaker(engine, expire_on_commit=False)
    tenant, other = f"ri-{uuid.uuid4().hex[:8]}", f"ri-{uuid.uuid4().hex[:8]}"
    with factory() as s, s.begin():
        mine = add_listing(s, tenant, "dress-1")
        theirs = add_listing(s, other, "dress-2")
    edited = review_event_payload(tenant_id=tenant, merchant_id="m1", listing_id=mine, decision="edited",
                                  corrected={"title": "Red floral midi dress", "attributes": {"length": "midi"}})
    cross = review_event_payload(tenant_id=tenant, merchant_id="m1", listing_id=theirs, decision="rejected")
    intake = StandaloneIntake(intake_settings)
    declare(intake.connection, topo)
    worker = threading.Thread(target=intake.run, daemon=True)
    worker.start()
    connection = pika.BlockingConnection(pika.URLParameters("amqp://guest:guest@127.0.0.1:5672/%2F"))
    try:
        channel = connection.channel()
        props = pika.BasicProperties(content_type="application/json", delivery_mode=2)
        for payload in (edited, edited, cross):  # the second is a redelivery of the same event id
            channel.basic_publish(exchange=topo.events.name, routing_key="listing.reviewed",
                                  body=json.dumps(payload).encode(), properties=props)

        def count(sql: str, **params: Any) -> int:
            with factory() as s:
                return int(s.execute(text(sql), params).scalar_one())

        _wait_for(lambda: count("SELECT count(*) FROM inbox_events WHERE event_id = :e", e=uuid.UUID(cross["event_id"])) == 1)
        _wait_for(lambda: count("SELECT count(*) FROM dead_letters WHERE queue = :q", q=topo.review_events.name) == 1)
        time.sleep(0.5)  # the duplicate delivery has been handled too (prefetch 1, in order)
        with factory() as s:
            assert s.execute(text("SELECT count(*) FROM review_feedback WHERE event_id = :e"),
                             {"e": uuid.UUID(edited["event_id"])}).scalar_one() == 1
            assert s.execute(text("SELECT status FROM listings WHERE id = :i"), {"i": mine}).scalar_one() == "edited"
            served = s.execute(text("SELECT title, attributes FROM catalog.current_listings WHERE listing_id = :i"),
                               {"i": mine}).one()  # the merchant's edit is what the catalog serves
            assert served.title == "Red floral midi dress"
            assert served.attributes["length"] == {"value": "midi", "confidence": 1.0, "source": "merchant"}
            generated = s.execute(text("SELECT generated_content ->> 'title' FROM listings WHERE id = :i"),
                                  {"i": mine}).scalar_one()
            assert generated == MODEL_OUTPUT["title"]  # kept beside the edit
            assert s.execute(text("SELECT status FROM listings WHERE id = :i"), {"i": theirs}).scalar_one() == "proposed"
            fields = s.execute(text("SELECT field FROM field_errors WHERE listing_id = :i ORDER BY field"),
                               {"i": mine}).scalars().all()
            assert fields == ["attributes.length", "title"]
            detail = s.execute(text("SELECT detail FROM inbox_events WHERE event_id = :e"),
                               {"e": uuid.UUID(cross["event_id"])}).scalar_one()
            # Under forced RLS the other tenant's listing does not exist for this tenant's transaction.
            assert detail.startswith("unknown_listing") and other not in detail
    finally:
        intake.should_stop = True
        worker.join(timeout=10)
        _delete_topology(connection, topo)
        connection.close()
        _delete_rows(factory, [tenant, other], topo.namespace)


def _delete_topology(connection: pika.BlockingConnection, topo: Any) -> None:
    channel = connection.channel()
    for queue in topo.all_queues:
        channel.queue_delete(queue=queue.name)
    for exchange in (topo.events, topo.tasks, topo.dead_letter):
        channel.exchange_delete(exchange=exchange.name)


def _delete_rows(factory: sessionmaker[Session], tenants: list[str], namespace: str) -> None:
    with factory() as s, s.begin():
        s.execute(text("DELETE FROM dead_letters WHERE queue LIKE :q"), {"q": f"{namespace}.%"})
        for tenant in tenants:
            for table in ("field_errors", "review_feedback", "inbox_events", "listings", "images", "products",
                          "merchants"):
                s.execute(text(f"DELETE FROM {table} WHERE tenant_id = :t"), {"t": tenant})
            s.execute(text("DELETE FROM tenants WHERE id = :t"), {"t": tenant})
        s.execute(text("DELETE FROM model_versions m WHERE m.name = 'tiny-vlm' AND NOT EXISTS "
                       "(SELECT 1 FROM listings l WHERE l.model_version_id = m.id)"))
