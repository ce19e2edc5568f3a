"""Transactional outbox: events are written with their cause and published after commit.

Two kinds of rows: domain events (routing key ``listing.*``) and stage hand-offs (``task:<name>``,
dispatched as Celery tasks by the same relay). The publisher given to ``relay`` handles both.

``enqueue`` only adds a row (inside the caller's transaction). ``relay`` publishes unpublished
rows with broker confirms and marks them; it runs right after a commit and periodically (beat),
so a crash between commit and publish delays an event but never loses it. Delivery is
at-least-once: consumers dedupe on ``event_id``.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import structlog
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
    return rows.add(session, tenant_id=tenant_id, message_id=message_id, routing_key=routing_key, payload=payload)


def enqueue_task(session: Session, task_name: str, job_id: int, *, queue: str, tenant_id: str,
                 trace: tracing.TraceContext | None = None) -> OutboxMessage:
    """A pipeline stage's task, dispatched by the relay only once this transaction committed: a
    crash between a stage's commit and its hand-off delays the next stage, never strands it.
    Callers go through ``tasks.pipeline.jobs.dispatch``, which reads the task and queue from the
    stage table."""
    payload: dict[str, Any] = {"task": task_name, "args": [job_id], "queue": queue}
    if trace is not None:
        payload[HEADERS_KEY] = trace.headers()
    return rows.add(session, tenant_id=tenant_id, message_id=uuid.uuid4(), routing_key=TASK_PREFIX + task_name,
                    payload=payload)


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
