"""The ``listing.reviewed`` consumer: raw JSON bytes in, one transaction, then ack or dead-letter.

Bound to the review-events queue by ``workers.intake.EventHandlers.queues_and_handlers``. Like the
product handler it never calls ``message.decode()``; reviews it refuses (invalid, unknown listing,
another tenant's listing) are recorded in the inbox and rejected to the dead-letter exchange.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from typing import TYPE_CHECKING

from kombu import Message
from sqlalchemy.exc import OperationalError

from db.engine import system_session, tenant_session
from tasks.events import InvalidEvent
from tasks.feedback.reviews import ReviewOutcome, apply_review, parse_review_event, reject_invalid_review
from workers.logs import bind_context, get_logger

if TYPE_CHECKING:
    from workers.intake import EventHandlers

log = get_logger(__name__)


def _body_id(body: bytes) -> uuid.UUID:
    """A stable id for an event without a readable one, so its redelivery is still a no-op."""
    return uuid.uuid5(uuid.NAMESPACE_URL, "sha256:" + hashlib.sha256(body).hexdigest())


def on_review_event(handlers: EventHandlers, message: Message) -> None:
    queue = handlers.topology.review_events.name
    body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
    try:
        try:
            event = parse_review_event(body, message.content_type)
        except InvalidEvent as exc:
            with system_session(handlers.factory) as session:  # the tenant may be unknown
                reject_invalid_review(session, exc, _body_id(body))
            handlers._reject(message, queue, "invalid_event", exc.detail)
            return
        with bind_context(event_id=str(event.event_id), tenant_id=event.tenant_id):
            with tenant_session(handlers.factory, event.tenant_id) as session:
                result = apply_review(session, event)
            if result.outcome is ReviewOutcome.rejected and result.code is not None:
                handlers._reject(message, queue, result.code.value, result.detail)
                return
            message.ack()
    except OperationalError as exc:
        log.warning("review.database_unavailable", error=str(exc).splitlines()[0][:200])
        time.sleep(1.0)
        message.requeue()
