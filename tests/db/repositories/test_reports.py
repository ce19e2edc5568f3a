"""The counts behind ``enrich status``: each named report query, and the report as the CLI collects it."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from db.repositories import reports
from tests.db.catalog_rows import add_products, add_tenant


def _job(session: Session, tenant: str, product_id: int, *, status: str, stage: str | None = None,
         error_code: str | None = None, seconds: int | None = None) -> None:
    """One job; ``seconds``: finished that long after it was created, now."""
    event = uuid.uuid4()
    session.execute(text("INSERT INTO inbox_events (event_id, tenant_id, event_type, status) "
                         "VALUES (:e, :t, 'product.created', 'accepted')"), {"e": event, "t": tenant})
    session.execute(
        text("INSERT INTO enrichment_jobs (tenant_id, event_id, product_id, product_version, status, stage, "
             "error_code, created_at, finished_at) VALUES (:t, :e, :p, 1, :s, :st, :code, "
             "now() - make_interval(secs => coalesce(CAST(:secs AS integer), 0)), "
             "CASE WHEN CAST(:secs AS integer) IS NULL THEN NULL ELSE now() END)"),
        {"t": tenant, "e": event, "p": product_id, "s": status, "st": stage, "code": error_code,
         "secs": seconds})


def _snapshot(session: Session) -> dict[str, Any]:
    return {"jobs": reports.jobs_by_status(session), "stages": reports.running_by_stage(session),
            "failures": reports.failures_by_code(session), "inbox": reports.inbox_by_status(session),
            "outbox": reports.outbox_pending(session), "dead": reports.dead_letters(session)}


def _grew(before: dict[Any, int], after: dict[Any, int]) -> dict[Any, int]:
    return {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}


def test_pipeline_counts(db_session: Session) -> None:
    s = db_session
    add_tenant(s, "rep-acme")
    pids = add_products(s, "rep-acme", [f"p{n}" for n in range(5)], ["dress"] * 5)
    before = _snapshot(s)
    _job(s, "rep-acme", pids[0], status="pending")
    _job(s, "rep-acme", pids[1], status="running", stage="model")
    _job(s, "rep-acme", pids[2], status="failed", stage="fetch", error_code="fetch_timeout")
    _job(s, "rep-acme", pids[3], status="done", stage="persist", seconds=4)
    _job(s, "rep-acme", pids[4], status="done", stage="persist", seconds=8)
    s.execute(text("INSERT INTO outbox (message_id, routing_key, payload) "
                   "VALUES (:m, 'listing.enriched', '{}')"), {"m": uuid.uuid4()})
    s.execute(text("INSERT INTO dead_letters (queue, reason, body) VALUES ('cpu', 'poison', '\\x00')"))
    after = _snapshot(s)

    assert _grew(before["jobs"], after["jobs"]) == {"done": 2, "failed": 1, "pending": 1, "running": 1}
    assert _grew(before["stages"], after["stages"]) == {"queued": 1, "model": 1}
    assert _grew(before["failures"], after["failures"]) == {"fetch_timeout": 1}
    assert _grew(before["inbox"], after["inbox"]) == {"accepted": 5}
    assert (after["outbox"] - before["outbox"], after["dead"] - before["dead"]) == (1, 1)
    throughput = reports.throughput_15min(s)
    assert throughput["done"] >= 2 and throughput["events_per_s"] > 0
    latency = reports.latency_15min(s)
    assert latency["p50"] is not None and latency["p50"] <= latency["p95"]


def test_collect_status_reads_every_report(admin_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """As the maintenance role, like ``enrich status``."""
    from db.engine import make_sessionmaker
    from workers import status

    monkeypatch.setattr(status, "get_admin_session_factory", lambda: make_sessionmaker(admin_engine))
    report = status.collect_status()
    assert list(report) == ["jobs_by_status", "running_by_stage", "failures_by_code", "intake",
                            "throughput_15min", "latency_s_15min", "outbox_pending", "dead_letters",
                            "coverage", "feedback", "stage_timings_ms_24h"]
    assert set(report["throughput_15min"]) == {"done", "events_per_s"}
    assert set(report["latency_s_15min"]) == {"p50", "p95"}
    assert {"products", "complete"} <= set(report["coverage"])
    assert set(report["feedback"]) == {"reviews", "by_decision", "error_rate_by_field",
                                       "error_rate_by_category", "last_datasets"}
    assert "jobs by status" in status.render_status(report)
