"""Transactional outbox: events are written with their cause and published after commit.

Two kinds of rows: domain events (routing key ``listing.*``) and stage hand-offs (``task:<name>``,
dispatched as Celery tasks by the same relay). The publisher given to ``relay`` handles both.

``enqueue`` only adds a row (inside the caller's transaction). Two relays publish rows with broker
confirms and mark them, each row once (they lock what they publish, and skip what another holds):

* ``relay_committed``, right after a task's commit, publishes the rows that task's own
  transactions committed (``collect`` gathers them as they commit; a rolled-back transaction's
  rows are dropped): the payloads are in memory, so nothing is read back but their ids;
* ``relay``, periodically (beat), from ``enrich relay``, and after a task that committed nothing
  (a redelivery that found its stage done: a crash between that commit and its relay may have left
  the hand-off behind), publishes every pending row in id order.

A crash between commit and publish delays an event but never loses it. Delivery is at-least-once:
consumers dedupe on ``event_id``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy import event as orm_event
from sqlalchemy.orm import Session, sessionmaker

from db.engine import system_session
from db.repositories import outbox as rows
from db.tables import OutboxMessage
from tasks import metrics, tracing
from tasks.events import validate
from tasks.runtime import EventPublisher

log = structlog.get_logger(__name__)

TASK_PREFIX = "task:"
HEADERS_KEY = "_headers"  # message headers (traceparent) kept beside the payload; never published in the body


def enqueue(session: Session, routing_key: str, payload: dict[str, Any], *, tenant_id: str | None) -> OutboxMessage:
    validate(payload, routing_key)  # never publish what our own contract would refuse
    message_id = uuid.UUID(payload["event_id"])
    if (trace := tracing.current()) is not None:
        payload = {**payload, HEADERS_KEY: trace.headers()}
    return _added(session, rows.add(session, tenant_id=tenant_id, message_id=message_id, routing_key=routing_key,
                                    payload=payload))


def enqueue_task(session: Session, task_name: str, job_id: int, *, queue: str, tenant_id: str,
                 trace: tracing.TraceContext | None = None) -> OutboxMessage:
    """A pipeline stage's task, dispatched by the relay only once this transaction committed: a
    crash between a stage's commit and its hand-off delays the next stage, never strands it.
    Callers go through ``tasks.pipeline.jobs.dispatch``, which reads the task and queue from the
    stage table."""
    payload: dict[str, Any] = {"task": task_name, "args": [job_id], "queue": queue}
    if trace is not None:
        payload[HEADERS_KEY] = trace.headers()
    return _added(session, rows.add(session, tenant_id=tenant_id, message_id=uuid.uuid4(),
                                    routing_key=TASK_PREFIX + task_name, payload=payload))


# ---- what this task's transactions committed ---------------------------------------------------

@dataclass(frozen=True)
class Committed:
    """An outbox row as its transaction wrote it: what ``relay_committed`` publishes without
    reading the row back."""

    id: int
    message_id: uuid.UUID
    routing_key: str
    payload: dict[str, Any]
    written_at: datetime  # for the relay-lag metric: when the row was added, a moment before its commit


_ADDED = "outbox.added"  # Session.info key: the rows this transaction added, until it commits
_COLLECTOR: ContextVar[list[Committed] | None] = ContextVar("outbox_committed", default=None)


def _added(session: Session, row: OutboxMessage) -> OutboxMessage:
    if _COLLECTOR.get() is not None:  # nobody collects (beat, the CLI, tests): nothing to keep
        session.info.setdefault(_ADDED, []).append(
            Committed(row.id, row.message_id, row.routing_key, row.payload, datetime.now(UTC)))
    return row


@orm_event.listens_for(Session, "after_commit")
def _collect_committed(session: Session) -> None:
    added, collector = session.info.pop(_ADDED, None), _COLLECTOR.get()
    if added and collector is not None:
        collector.extend(added)


@orm_event.listens_for(Session, "after_rollback")
def _drop_rolled_back(session: Session) -> None:
    session.info.pop(_ADDED, None)


@contextmanager
def collect() -> Iterator[list[Committed]]:
    """Gather the outbox rows that the block's transactions commit, in this thread (another
    thread, such as a claim heartbeat, collects nothing), for ``relay_committed`` after it."""
    committed: list[Committed] = []
    token = _COLLECTOR.set(committed)
    try:
        yield committed
    finally:
        _COLLECTOR.reset(token)


def relay(factory: sessionmaker[Session], publisher: EventPublisher, *, limit: int = 500) -> int:
    """Publish up to ``limit`` pending messages in id order; returns how many were published."""
    published = 0
    with system_session(factory) as session:  # one relay publishes every tenant's messages
        for row in rows.lock_pending(session, limit):
            row.publish_attempts += 1
            try:
                publisher.publish(row.routing_key, row.payload, message_id=str(row.message_id))
            except Exception as exc:  # noqa: BLE001 - keep the rest for the next relay
                log.warning("outbox.publish_failed", message_id=str(row.message_id), error=str(exc))
                break
            row.published_at = datetime.now(UTC)
            metrics.on_commit(session, lambda key=row.routing_key, at=row.created_at: metrics.outbox_relayed(key, at))
            published += 1
    if published:
        log.info("outbox.relayed", count=published)
    return published


def relay_committed(factory: sessionmaker[Session], publisher: EventPublisher, committed: list[Committed]) -> int:
    """Publish the rows ``collect`` gathered, in id order, and mark them in one statement; returns
    how many were published. A row already published (by a periodic relay) or held by another
    relay is left alone; after a failed publish the rest wait for the periodic relay."""
    if not committed:
        return 0
    by_id = {row.id: row for row in committed}
    published: list[Committed] = []
    with system_session(factory) as session:
        for row_id in rows.lock_pending_of(session, sorted(by_id)):
            row = by_id[row_id]
            try:
                publisher.publish(row.routing_key, row.payload, message_id=str(row.message_id))
            except Exception as exc:  # noqa: BLE001 - the periodic relay publishes it
                log.warning("outbox.publish_failed", message_id=str(row.message_id), error=str(exc))
                rows.count_failed_attempt(session, row_id)
                break
            published.append(row)
        rows.mark_published(session, [row.id for row in published])
        for row in published:
            metrics.on_commit(session, lambda key=row.routing_key, at=row.written_at: metrics.outbox_relayed(key, at))
    return len(published)
