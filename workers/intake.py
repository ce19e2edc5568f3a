"""Domain-event intake: product events, reviews and dead letters, consumed as plain JSON.

Handlers receive the raw kombu message and never call ``message.decode()``: only
``application/json`` bodies are parsed (tasks.events), so a pickled message is refused unread.
They run inside the Celery worker as a consumer bootstep (``enrich worker --queues events,…``)
or alone in a kombu consumer loop (``enrich worker --queues events``). Events this intake refuses
(invalid, an unknown listing, another tenant's listing) are recorded in the inbox and rejected to
the dead-letter exchange; on brokers without one, the application keeps the message itself.

Settling a message (ack, reject, requeue) comes after its transaction committed. If that fails
because the broker connection is gone (a RabbitMQ restart), nothing went wrong with the event:
``intake.ack_failed`` is logged, no dead letter is written, and the connection error goes on to
the consumer, which reconnects; the broker redelivers the message and the inbox makes that a no-op.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import amqp.exceptions
import kombu.exceptions
from celery import bootsteps
from kombu import Connection, Consumer, Message
from kombu.mixins import ConsumerMixin
from sqlalchemy.exc import OperationalError

from db.engine import job_session, system_session, tenant_session
from db.repositories import dead_letters
from tasks import metrics, tracing
from tasks.errors import ErrorCode
from tasks.events import InvalidEvent, parse_product_event
from tasks.feedback.reviews import ReviewOutcome, apply_review, parse_review_event, reject_invalid_review
from tasks.pipeline import jobs
from tasks.pipeline.decisions import (
    DUPLICATE_REVIEW_KEY,
    DecisionOutcome,
    apply_duplicate_review,
    parse_duplicate_review,
    reject_invalid_duplicate_review,
)
from tasks.pipeline.intake import Outcome, accept_product_event, reject_invalid_event
from tasks.pipeline.outbox import relay
from workers.broker import broker_kind, broker_url
from workers.database import get_session_factory
from workers.logs import bind_context, get_logger
from workers.publisher import KombuEventPublisher, SendTask
from workers.settings import Settings, get_settings
from workers.topology import Topology, build_topology

log = get_logger(__name__)

# What a lost broker connection raises from ack/reject/requeue: py-amqp's connection errors, socket
# errors (ConnectionResetError, BrokenPipeError, …), kombu's wrapper; plus the transport's own
# (redis) where the message's channel names them.
BROKER_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    amqp.exceptions.ConnectionError, OSError, kombu.exceptions.OperationalError)


class BrokerConnectionLost(Exception):
    """Settling a message failed because the broker connection is gone (``original`` is the error)."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(str(original))
        self.original = original


def _connection_errors(message: Message) -> tuple[type[BaseException], ...]:
    transport = getattr(getattr(message, "channel", None), "connection", None)
    extra = getattr(transport, "connection_errors", ())
    return BROKER_CONNECTION_ERRORS + tuple(e for e in extra if isinstance(e, type))


def settle(message: Message, action: str, **kwargs: Any) -> None:
    """``message.ack()`` / ``reject(requeue=…)`` / ``requeue()``; a lost connection becomes
    ``BrokerConnectionLost`` (logged ``intake.ack_failed``), anything else propagates as it is."""
    try:
        getattr(message, action)(**kwargs)
    except _connection_errors(message) as exc:
        log.warning("intake.ack_failed", action=action, routing_key=message.delivery_info.get("routing_key"),
                    error=f"{type(exc).__name__}: {exc}"[:200])
        raise BrokerConnectionLost(exc) from exc


class EventHandlers:
    """The three handlers (products, reviews, dead letters), sharing one publisher and one session
    factory per process. ``send_task`` sends the first stage the intake committed to the outbox."""

    def __init__(self, settings: Settings, send_task: SendTask | None = None) -> None:
        self.settings = settings
        self.rabbitmq = broker_kind(broker_url(settings)) == "rabbitmq"
        self.topology: Topology = build_topology(settings, rabbitmq=self.rabbitmq)
        self.publisher = KombuEventPublisher(settings, send_task)
        self._factory = None

    @property
    def factory(self):  # noqa: ANN201
        if self._factory is None:
            self._factory = get_session_factory()
        return self._factory

    def _relay(self) -> None:
        try:
            relay(self.factory, self.publisher)
        except Exception as exc:  # noqa: BLE001 - the periodic relay catches up
            log.warning("outbox.relay_deferred", error=str(exc)[:200])

    def _keep_dead_letter(self, message: Message, queue: str, reason: str, detail: str | None,
                          tenant_id: str | None = None) -> None:
        with system_session(self.factory) as session:
            dead_letters.keep(session, tenant_id=tenant_id, queue=queue,
                              routing_key=message.delivery_info.get("routing_key"), reason=reason,
                              detail=detail or "", headers=_jsonable(message.headers), body=_body(message))

    def _reject(self, message: Message, queue: str, reason: str, detail: str) -> None:
        """Dead-letter: the broker does it on RabbitMQ; elsewhere the application keeps the message."""
        if not self.rabbitmq:
            self._keep_dead_letter(message, queue, reason, detail)
        settle(message, "reject", requeue=False)

    def on_product_event(self, message: Message) -> None:
        try:
            self._on_product_event(message)
        except BrokerConnectionLost as lost:
            raise lost.original from None  # the consumer's reconnect handling takes it from here

    def _on_product_event(self, message: Message) -> None:
        rk = message.delivery_info.get("routing_key", "")
        body = _body(message)
        metrics.event_received("product")
        try:
            try:
                event = parse_product_event(body, message.content_type, rk)
            except InvalidEvent as exc:
                with system_session(self.factory) as session:  # the tenant may be unknown
                    reject_invalid_event(session, exc, body, rk)
                metrics.event_outcome("product", "refused", ErrorCode.invalid_event.value)
                self._relay()
                self._reject(message, self.topology.product_events.name, "invalid_event", exc.detail)
                return
            with bind_context(event_id=str(event.event_id), tenant_id=event.tenant_id, product_id=event.external_id), \
                    tracing.bound(tracing.from_headers(message.headers)):
                with tenant_session(self.factory, event.tenant_id) as session:
                    result = accept_product_event(session, event)
                metrics.event_outcome("product", *_PRODUCT_OUTCOMES[result.outcome])
                if result.outcome is not Outcome.duplicate:
                    self._relay()  # the fetch hand-off (or the stale_version event) committed above
                settle(message, "ack")
        except BrokerConnectionLost:
            raise  # committed (or nothing to commit): not a handler bug, no dead letter
        except OperationalError as exc:
            log.warning("intake.database_unavailable", error=str(exc).splitlines()[0][:200])
            time.sleep(1.0)
            settle(message, "requeue")
        except Exception as exc:  # noqa: BLE001 - a bug must not take the consumer down with it
            log.exception("intake.crashed", routing_key=rk)
            try:
                self._keep_dead_letter(message, self.topology.product_events.name, "internal_error",
                                       f"{type(exc).__name__}: {exc}"[:2000])
            finally:
                settle(message, "reject", requeue=False)

    def on_dead_letter(self, message: Message) -> None:
        """A message the broker gave up on (delivery limit): keep it, and end its job as failed."""
        try:
            self._on_dead_letter(message)
        except BrokerConnectionLost as lost:
            raise lost.original from None

    def _on_dead_letter(self, message: Message) -> None:
        metrics.event_received("dead_letter")
        headers = message.headers or {}
        deaths = headers.get("x-death") or []
        reason = str(deaths[0].get("reason")) if deaths else "dead-lettered"
        queue = str(deaths[0].get("queue")) if deaths else "?"
        job_id = _job_id_of_task(message) if headers.get("task") else None
        self._keep_dead_letter(message, queue, reason, f"task {headers.get('task')}" if job_id else None)
        if job_id is not None:
            why = (f"was delivered {self.settings.broker.delivery_limit}+ times and the worker died each time"
                   if reason == "delivery_limit" else f"was dead-lettered by the broker ({reason})")
            with job_session(self.factory, job_id) as session:
                jobs.fail(session, job_id, ErrorCode.worker_lost, f"{headers.get('task')} {why}", retryable=False)
            self._relay()
        settle(message, "ack")

    def on_review_event(self, message: Message) -> None:
        """``listing.reviewed``: raw JSON bytes in, one tenant-scoped transaction, then ack or dead-letter."""
        try:
            self._on_review_event(message)
        except BrokerConnectionLost as lost:
            raise lost.original from None

    def _on_review_event(self, message: Message) -> None:
        if message.delivery_info.get("routing_key") == DUPLICATE_REVIEW_KEY:  # same queue, own contract
            self._on_merchant_review(message, "duplicate_review", parse_duplicate_review,
                                     reject_invalid_duplicate_review, apply_duplicate_review,
                                     _decision_outcome)
            return
        self._on_merchant_review(message, "review", parse_review_event, reject_invalid_review, apply_review,
                                 _review_outcome)

    def _on_merchant_review(self, message: Message, kind: str, parse: Callable[..., Any],
                            reject_invalid: Callable[..., Any], apply: Callable[..., Any],
                            outcome: Callable[[Any], tuple[str, str | None, str | None]]) -> None:
        """A merchant's review (of a listing, of a duplicate pair): raw JSON bytes in, one
        tenant-scoped transaction, then ack or dead-letter. ``outcome`` maps the result to
        (metrics outcome, code, dead-letter detail or None)."""
        queue = self.topology.review_events.name
        body = _body(message)
        metrics.event_received(kind)
        try:
            try:
                event = parse(body, message.content_type)
            except InvalidEvent as exc:
                with system_session(self.factory) as session:  # the tenant may be unknown
                    reject_invalid(session, exc, _body_id(body))
                metrics.event_outcome(kind, "refused", ErrorCode.invalid_event.value)
                self._reject(message, queue, "invalid_event", exc.detail)
                return
            with bind_context(event_id=str(event.event_id), tenant_id=event.tenant_id), \
                    tracing.bound(tracing.from_headers(message.headers)):
                with tenant_session(self.factory, event.tenant_id) as session:
                    result = apply(session, event)
                label, code, refused = outcome(result)
                metrics.event_outcome(kind, label, code)
                if refused is not None and code is not None:
                    self._reject(message, queue, code, refused)
                    return
                settle(message, "ack")
        except OperationalError as exc:
            log.warning("review.database_unavailable", kind=kind, error=str(exc).splitlines()[0][:200])
            time.sleep(1.0)
            settle(message, "requeue")

    def queues_and_handlers(self) -> list[tuple[Any, Callable[[Message], None]]]:
        return [
            (self.topology.product_events, self.on_product_event),
            (self.topology.review_events, self.on_review_event),
            (self.topology.dead_letters, self.on_dead_letter),
        ]


# intake outcome → (metric outcome, refusal code)
_PRODUCT_OUTCOMES: dict[Outcome, tuple[str, str | None]] = {
    Outcome.accepted: ("accepted", None), Outcome.redispatch: ("duplicate", None),
    Outcome.duplicate: ("duplicate", None), Outcome.stale: ("refused", ErrorCode.stale_version.value),
    Outcome.rejected: ("refused", ErrorCode.invalid_event.value)}


def _review_outcome(result: Any) -> tuple[str, str | None, str | None]:
    label = "accepted" if result.outcome is ReviewOutcome.applied else result.outcome.value
    code = result.code.value if result.code else None
    return label, code, result.detail if result.outcome is ReviewOutcome.rejected else None


def _decision_outcome(result: Any) -> tuple[str, str | None, str | None]:
    """A valid decision is always applied or remembered (stale, replayed): nothing to refuse."""
    return ("duplicate" if result.outcome is DecisionOutcome.duplicate else "accepted"), None, None


def _body(message: Message) -> bytes:
    return message.body if isinstance(message.body, bytes) else str(message.body).encode()


def _body_id(body: bytes) -> uuid.UUID:
    """A stable id for an event without a readable one, so its redelivery is still a no-op."""
    return uuid.uuid5(uuid.NAMESPACE_URL, "sha256:" + hashlib.sha256(body).hexdigest())


def _job_id_of_task(message: Message) -> int | None:
    try:
        args = json.loads(message.body)[0]
        return int(args[0]) if args else None
    except (ValueError, TypeError, IndexError, KeyError):
        return None


def _jsonable(value: Any) -> Any:
    try:
        return json.loads(json.dumps(value, default=str))
    except (TypeError, ValueError):
        return {}


class IntakeStep(bootsteps.ConsumerStep):
    """Runs the event handlers inside a Celery worker's consumer."""

    def get_consumers(self, channel) -> list[Consumer]:  # noqa: ANN001
        from workers.celery_app import send_task

        handlers = EventHandlers(get_settings(), send_task)
        consumers = []
        for queue, handler in handlers.queues_and_handlers():
            consumers.append(Consumer(channel, queues=[queue], on_message=handler, prefetch_count=1,
                                      accept=["application/json"]))
        return consumers


class StandaloneIntake(ConsumerMixin):
    """The same handlers in a plain kombu consumer loop, for an events-only worker."""

    def __init__(self, settings: Settings) -> None:
        from workers.celery_app import send_task

        self.connection = Connection(broker_url(settings))
        self.handlers = EventHandlers(settings, send_task)

    def get_consumers(self, consumer_cls, channel) -> list[Consumer]:  # noqa: ANN001
        return [consumer_cls(queues=[q], on_message=h, prefetch_count=1, accept=["application/json"])
                for q, h in self.handlers.queues_and_handlers()]
