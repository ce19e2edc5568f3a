"""Bookkeeping rows of a given age for the retention tests: inbox events, jobs, outbox rows, dead
letters. Seeded as the connecting superuser (row-level security does not filter it); every age is
relative to the database clock of the caller's transaction."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

DAY = timedelta(days=1)


def db_now(session: Session) -> datetime:
    return session.execute(text("SELECT now()")).scalar_one()


def add_event(session: Session, tenant: str | None, *, age: timedelta, event_type: str = "product.created",
              status: str = "accepted", event_id: uuid.UUID | None = None) -> uuid.UUID:
    event_id = event_id or uuid.uuid4()
    session.execute(text("INSERT INTO inbox_events (event_id, tenant_id, event_type, status, received_at) "
                         "VALUES (:e, :t, :et, :s, now() - CAST(:age AS interval))"),
                    {"e": event_id, "t": tenant, "et": event_type, "s": status, "age": age})
    return event_id


def add_job(session: Session, tenant: str, product_id: int, *, status: str, created: timedelta,
            finished: timedelta | None = None, error_code: str | None = None, ran_model: bool = False,
            timings: dict[str, float] | None = None, version: int = 1) -> tuple[int, uuid.UUID]:
    """A job (and its inbox event, received when the job was created); ``created`` / ``finished``: ages."""
    event_id = add_event(session, tenant, age=created)
    job_id = session.execute(text(
        "INSERT INTO enrichment_jobs (tenant_id, event_id, product_id, product_version, status, stage, error_code, "
        "retryable, attempts, timings_ms, created_at, updated_at, finished_at) VALUES (:t, :e, :p, :v, :s, 'persist', "
        "CAST(:code AS text), :retryable, CAST(:attempts AS jsonb), CAST(:timings AS jsonb), "
        "now() - CAST(:created AS interval), "
        "now() - coalesce(CAST(:finished AS interval), CAST(:created AS interval)), "
        "now() - CAST(:finished AS interval)) RETURNING id"),
        {"t": tenant, "e": event_id, "p": product_id, "v": version, "s": status, "code": error_code,
         "retryable": False if error_code else None,
         "attempts": json.dumps({"fetch": 1, **({"model": 1} if ran_model else {})}),
         "timings": json.dumps(timings or {}), "created": created, "finished": finished}).scalar_one()
    return int(job_id), event_id


def add_outbox(session: Session, *, published: timedelta | None, tenant: str | None = None) -> int:
    """An outbox row; ``published``: how long ago it was published (None: never)."""
    return int(session.execute(text(
        "INSERT INTO outbox (tenant_id, message_id, routing_key, payload, created_at, published_at) "
        "VALUES (:t, :m, 'listing.enriched', '{}', now() - coalesce(CAST(:p AS interval), interval '0'), "
        "now() - CAST(:p AS interval)) RETURNING id"),
        {"t": tenant, "m": uuid.uuid4(), "p": published}).scalar_one())


def add_dead_letter(session: Session, *, age: timedelta, resolved: timedelta | None = None,
                    resolution: str | None = None, routing_key: str | None = "product.created",
                    body: bytes = b"{}", headers: dict[str, Any] | None = None, tenant: str | None = None) -> int:
    """A dead letter kept ``age`` ago; resolved (``resolution``) ``resolved`` ago, or not."""
    return int(session.execute(text(
        "INSERT INTO dead_letters (tenant_id, queue, routing_key, reason, detail, headers, body, created_at, "
        "resolved_at, resolution) VALUES (:t, 'catalog.product-events', :rk, 'internal_error', 'boom', "
        "CAST(:h AS jsonb), :b, now() - CAST(:age AS interval), now() - CAST(:r AS interval), :res) RETURNING id"),
        {"t": tenant, "rk": routing_key, "h": json.dumps(headers or {}), "b": body, "age": age, "r": resolved,
         "res": resolution}).scalar_one())


def ids(session: Session, table: str, column: str = "id") -> set[Any]:
    return set(session.execute(text(f"SELECT {column} FROM {table}")).scalars())
