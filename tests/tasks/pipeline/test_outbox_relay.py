"""The relay after a task: it publishes what that task's transactions committed, once, and nothing
else; the periodic relay keeps everything else.

Real commits as the runtime role (``enrich_worker``, forced row-level security), through the
workers' own engine setup (``worker_engine``); the rows each test writes are deleted after it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from db.engine import make_sessionmaker, system_session, tenant_session
from tasks.errors import ErrorCode
from tasks.events import failed_event
from tasks.pipeline import outbox


class Recorder:
    """A publisher that keeps what it was given; ``fail_on`` refuses those message ids."""

    def __init__(self, fail_on: set[str] | None = None) -> None:
        self.sent: list[tuple[str, dict[str, Any], str]] = []
        self.fail_on = fail_on or set()

    def publish(self, routing_key: str, payload: dict[str, Any], *, message_id: str) -> None:
        if message_id in self.fail_on:
            raise ConnectionError("broker unreachable")
        self.sent.append((routing_key, payload, message_id))


@pytest.fixture
def factory(worker_engine, engine) -> Iterator[sessionmaker[Session]]:  # noqa: ANN001
    """The workers' sessions; afterwards the test tenant's outbox rows are removed (as the owner)."""
    yield make_sessionmaker(worker_engine)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM outbox WHERE tenant_id = :t"), {"t": TENANT})


TENANT = f"relay-{uuid.uuid4().hex[:8]}"


def _event(n: int) -> dict[str, Any]:
    return failed_event(causation_id=uuid.uuid4(), code=ErrorCode.image_fetch_failed, detail="404", retryable=False,
                        tenant_id=TENANT, merchant_id="m", external_id=f"p{n}", version=1)


def _state(factory: sessionmaker[Session], row_id: int) -> tuple[bool, int]:
    with system_session(factory) as session:
        published, attempts = session.execute(
            text("SELECT published_at IS NOT NULL, publish_attempts FROM outbox WHERE id = :i"), {"i": row_id}).one()
    return published, attempts


def test_the_task_relay_publishes_what_the_task_committed_once_and_nothing_else(
        factory: sessionmaker[Session]) -> None:
    with tenant_session(factory, TENANT) as session:  # another task's row, left for the periodic relay
        left = outbox.enqueue(session, "listing.failed", _event(0), tenant_id=TENANT).id
    with outbox.collect() as committed:
        with tenant_session(factory, TENANT) as session:
            event = _event(1)
            mine = outbox.enqueue(session, "listing.failed", event, tenant_id=TENANT).id
            handoff = outbox.enqueue_task(session, "catalog.fetch", 7, queue="cpu", tenant_id=TENANT).id
        with pytest.raises(RuntimeError), tenant_session(factory, TENANT) as session:
            outbox.enqueue(session, "listing.failed", _event(2), tenant_id=TENANT)
            raise RuntimeError("the transaction rolls back")
    assert [row.id for row in committed] == [mine, handoff]  # the rolled-back row was never committed

    publisher = Recorder()
    assert outbox.relay_committed(factory, publisher, committed) == 2
    assert [(key, mid) for key, _, mid in publisher.sent] == [
        ("listing.failed", event["event_id"]), ("task:catalog.fetch", str(committed[1].message_id))]
    assert publisher.sent[0][1] == event  # the payload as written, not read back
    assert publisher.sent[1][1] == {"task": "catalog.fetch", "args": [7], "queue": "cpu"}
    assert _state(factory, mine) == _state(factory, handoff) == (True, 1)
    assert _state(factory, left) == (False, 0)  # not this task's: the periodic relay's

    # The second time (a retried relay, a redelivery's list): nothing is published again.
    assert outbox.relay_committed(factory, publisher, committed) == 0
    assert len(publisher.sent) == 2 and _state(factory, mine) == (True, 1)


def test_a_row_another_relay_holds_is_left_to_that_relay(factory: sessionmaker[Session], worker_engine) -> None:  # noqa: ANN001
    with outbox.collect() as committed, tenant_session(factory, TENANT) as session:
        row_id = outbox.enqueue(session, "listing.failed", _event(3), tenant_id=TENANT).id
    publisher = Recorder()
    with system_session(make_sessionmaker(worker_engine)) as other:  # the periodic relay, mid-publish
        held = other.execute(text("SELECT id FROM outbox WHERE id = :i FOR UPDATE"), {"i": row_id}).scalar_one()
        assert held == row_id
        assert outbox.relay_committed(factory, publisher, committed) == 0
        assert publisher.sent == []
    assert _state(factory, row_id) == (False, 0)
    assert outbox.relay_committed(factory, publisher, committed) == 1  # released: this relay's again
    assert _state(factory, row_id) == (True, 1)


def test_after_a_failed_publish_the_rows_wait_and_are_published_once_later(factory: sessionmaker[Session]) -> None:
    with outbox.collect() as committed, tenant_session(factory, TENANT) as session:
        first = outbox.enqueue(session, "listing.failed", _event(4), tenant_id=TENANT)
        second = outbox.enqueue(session, "listing.failed", _event(5), tenant_id=TENANT)
    down = Recorder(fail_on={str(first.message_id)})
    assert outbox.relay_committed(factory, down, committed) == 0
    assert down.sent == []  # nothing after the failure either: publication stays in id order
    assert _state(factory, first.id) == (False, 1) and _state(factory, second.id) == (False, 0)
    up = Recorder()
    assert outbox.relay_committed(factory, up, committed) == 2
    assert [mid for _, _, mid in up.sent] == [str(first.message_id), str(second.message_id)]
    assert _state(factory, first.id) == (True, 2) and _state(factory, second.id) == (True, 1)


def test_nothing_is_gathered_outside_a_collect_block(factory: sessionmaker[Session]) -> None:
    with outbox.collect() as committed:
        pass
    with tenant_session(factory, TENANT) as session:  # beat, the CLI: the periodic relay's rows
        outbox.enqueue(session, "listing.failed", _event(6), tenant_id=TENANT)
    assert committed == []
    assert outbox.relay_committed(factory, Recorder(), committed) == 0
