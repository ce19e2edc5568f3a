"""Dead letters as an operator resolves them: listed until resolved, a domain event replayed onto the
real (embedded) broker where the intake's queue receives it, the rest discarded, each once.

As ``enrich_admin`` in the system scope, as ``enrich dead-letters …`` runs; rows seeded as the superuser.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Connection
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from tasks.events import product_event_payload
from tasks.maintenance.dead_letters import discard, list_dead_letters, replay
from tests.conftest import ADMIN_ROLE, as_role
from tests.tasks.maintenance.bookkeeping_rows import DAY, add_dead_letter, add_event
from workers.broker import broker_url
from workers.publisher import KombuEventPublisher
from workers.settings import Settings
from workers.topology import build_topology


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data")


@pytest.fixture
def publisher(settings: Settings) -> Iterator[KombuEventPublisher]:
    pub = KombuEventPublisher(settings)
    yield pub
    pub.close()


def _factory(session: Session) -> sessionmaker[Session]:
    return sessionmaker(bind=session.connection(), join_transaction_mode="create_savepoint", expire_on_commit=False)


def _received(settings: Settings) -> list[dict]:
    """Every message waiting in the product-events queue the intake consumes."""
    out = []
    with Connection(broker_url(settings)) as conn:
        queue = build_topology(settings, rabbitmq=False).product_events(conn.default_channel)
        while (message := queue.get(no_ack=True)) is not None:
            out.append({"routing_key": message.delivery_info.get("routing_key"), "body": json.loads(message.body),
                        "content_type": message.content_type})
    return out


def test_list_replay_discard(db_session: Session, settings: Settings, publisher: KombuEventPublisher) -> None:
    s = db_session
    event = product_event_payload(tenant_id="dl-acme", merchant_id="m1", external_id="sku-9", version=1,
                                  category="dress", image_urls=["https://img.example/9.jpg"])
    replayable = add_dead_letter(s, age=2 * DAY, body=json.dumps(event).encode(), tenant="dl-acme")
    task = add_dead_letter(s, age=DAY, routing_key="cpu", headers={"task": "catalog.fetch"}, body=b"[[7], {}, {}]")
    seen_id = uuid.uuid4()
    add_event(s, None, age=DAY, status="rejected", event_id=seen_id)
    already_seen = add_dead_letter(s, age=DAY, body=json.dumps({"event_id": str(seen_id)}).encode())
    old = add_dead_letter(s, age=9 * DAY, resolved=8 * DAY, resolution="discarded")
    factory = _factory(s)

    with as_role(s, ADMIN_ROLE):
        listed = list_dead_letters(factory)
        assert [v.id for v in listed if v.id in {replayable, task, already_seen, old}] == [replayable, task,
                                                                                         already_seen]
        view = next(v for v in listed if v.id == replayable)
        assert (view.event_id, view.routing_key, view.resolution) == (event["event_id"], "product.created", None)
        assert old in {v.id for v in list_dead_letters(factory, include_resolved=True)}

        results = {r.id: r for r in replay(factory, publisher, [replayable, task, already_seen, 10**12])}
        assert results[replayable].ok and event["event_id"] in results[replayable].detail
        assert not results[task].ok and "not a domain event" in results[task].detail
        assert not results[already_seen].ok and "already in the inbox (rejected)" in results[already_seen].detail
        assert not results[10**12].ok and results[10**12].detail == "no such dead letter"
        again = replay(factory, publisher, [replayable])
        assert not again[0].ok and again[0].detail == "already replayed"

        discarded = discard(factory, [task, replayable])
        assert [r.ok for r in discarded] == [True, False] and discarded[1].detail == "already replayed"
        remaining = {v.id for v in list_dead_letters(factory)}
        assert {already_seen} <= remaining and not remaining & {replayable, task}

    received = _received(settings)
    assert received == [{"routing_key": "product.created", "body": event, "content_type": "application/json"}]
    resolutions = dict(s.execute(text("SELECT id, resolution FROM dead_letters WHERE id IN (:a, :b, :c)"),
                                 {"a": replayable, "b": task, "c": already_seen}).tuples().all())
    assert resolutions == {replayable: "replayed", task: "discarded", already_seen: None}
