"""``enrich status``: what the pipeline is doing, read from the database."""

from __future__ import annotations

from typing import Any

from db.engine import admin_session
from db.repositories import reports
from tasks.pipeline.reconcile import coverage_counts
from workers.database import get_admin_session_factory
from workers.settings import get_settings
from workers.wiring import stall_thresholds


def collect_status() -> dict[str, Any]:
    # Platform-wide counts: one maintenance transaction, the system scope as the admin role (the
    # owner is filtered by the forced policies too and would count nothing).
    with admin_session(get_admin_session_factory()) as session:
        return {
            "jobs_by_status": reports.jobs_by_status(session),
            "running_by_stage": reports.running_by_stage(session),
            "failures_by_code": reports.failures_by_code(session),
            "intake": reports.inbox_by_status(session),
            "throughput_15min": reports.throughput_15min(session),
            "latency_s_15min": reports.latency_15min(session),
            "outbox_pending": reports.outbox_pending(session),
            "dead_letters": reports.dead_letters(session),
            "coverage": coverage_counts(session, **stall_thresholds(get_settings())),
            "feedback": reports.feedback_report(session),
        }


def render_status(report: dict[str, Any]) -> str:
    lines: list[str] = []
    for key, value in report.items():
        title = key.replace("_", " ")
        if isinstance(value, dict) and value and not any(isinstance(v, (dict, list)) for v in value.values()):
            lines.append(f"{title}: " + ", ".join(f"{k}={v}" for k, v in value.items()))
        elif isinstance(value, (dict, list)):
            lines.append(f"{title}:")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for k, v in items:
                lines.append(f"  {k}: {v}")
        else:
            lines.append(f"{title}: {value}")
    return "\n".join(lines)
