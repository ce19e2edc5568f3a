"""Publishing what the outbox holds: domain events as plain JSON on the events exchange (publisher
confirms), and stage hand-offs as Celery tasks.

The publisher does not import the Celery app: whoever builds it passes ``send_task`` (the app's
``send_task`` in a worker, ``workers.celery_app.send_task``), and a publisher built without one
refuses stage hand-offs with a clear error rather than importing the app behind the caller's back.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

from kombu import Connection, Producer

from tasks.pipeline.outbox import HEADERS_KEY, TASK_PREFIX
from workers.broker import broker_kind, broker_url
from workers.settings import Settings
from workers.topology import TaskQueue, Topology, build_topology, declare

SendTask = Callable[..., Any]
"""``send_task(name, *, args, queue, exchange, routing_key)``: Celery's ``app.send_task`` shape."""


class KombuEventPublisher:
    """Thread-safe; one connection per process, re-established on failure."""

    def __init__(self, settings: Settings, send_task: SendTask | None = None) -> None:
        self._send_task = send_task
        self._url = broker_url(settings)
        self._rabbit = broker_kind(self._url) == "rabbitmq"
        self.topology: Topology = build_topology(settings, rabbitmq=self._rabbit)
        self._timeout = settings.broker.publish_confirm_timeout_s
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._producer: Producer | None = None

    def _ensure(self) -> Producer:
        if self._producer is None:
            options = {"confirm_publish": True} if self._rabbit else {}
            self._conn = Connection(self._url, transport_options=options, connect_timeout=self._timeout)
            self._conn.ensure_connection(max_retries=3)
            declare(self._conn, self.topology)
            self._producer = Producer(self._conn.channel(), exchange=self.topology.events)
        return self._producer

    def publish(self, routing_key: str, payload: dict[str, Any], *, message_id: str) -> None:
        if routing_key.startswith(TASK_PREFIX):
            self._dispatch(payload)
            return
        extra = payload.get(HEADERS_KEY) or {}
        payload = {k: v for k, v in payload.items() if k != HEADERS_KEY}
        body = json.dumps(payload, ensure_ascii=False).encode()
        with self._lock:
            try:
                self._ensure().publish(body, routing_key=routing_key, content_type="application/json",
                                       content_encoding="utf-8", delivery_mode=2, message_id=message_id,
                                       headers={**extra, "event_type": payload.get("event_type", routing_key)},
                                       retry=True, retry_policy={"max_retries": 3})
            except Exception:
                self.close()
                raise

    def _dispatch(self, payload: dict[str, Any]) -> None:
        """A stage hand-off from the outbox: a Celery task message on the stage's queue."""
        if self._send_task is None:
            raise RuntimeError("this publisher was built without send_task; it publishes domain events only")
        logical = TaskQueue(payload["queue"])
        headers = payload.get(HEADERS_KEY)
        self._send_task(payload["task"], args=payload["args"], queue=self.topology.task_queue(logical),
                        exchange=self.topology.tasks.name, routing_key=logical.value,
                        **({"headers": headers} if headers else {}))

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.release()
            except Exception:  # noqa: BLE001
                pass
        self._conn, self._producer = None, None
