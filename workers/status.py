"""``enrich status``: what the pipeline is doing, read from the database.

Counts of jobs and intake are the live rows plus the hourly summaries the pruner folded deleted
rows into (``db.repositories.retention``), so no figure drops when retention removes history.
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

from db.engine import admin_session
from db.repositories import reports, retention
from tasks.pipeline.reconcile import coverage_counts
from workers.database import get_admin_session_factory
from workers.settings import get_settings
from workers.wiring import stall_thresholds

TIMINGS_WINDOW = timedelta(hours=24)


def merged_counts(live: dict[str, int], summarised: dict[str, int]) -> dict[str, int]:
    """Live counts plus summarised ones, most frequent first (ties by name)."""
    out = dict(live)
    for key, n in summarised.items():
        out[key] = out.get(key, 0) + n
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))


def histogram_quantile(buckets: dict[float, int], q: float) -> float | str | None:
    """The upper bound (ms) of the bucket holding quantile ``q``; ``'>N'`` in the overflow bucket."""
    total = sum(buckets.values())
    if not total:
        return None
    seen = 0
    bounds = sorted(buckets)
    for bound in bounds:
        seen += buckets[bound]
        if seen >= q * total:
            if math.isinf(bound):
                finite = [b for b in retention.HISTOGRAM_BOUNDS_MS if not math.isinf(b)]
                return f">{finite[-1]:g}"
            return bound
    return None


def stage_timings(histograms: dict[str, dict[float, int]]) -> dict[str, dict[str, Any]]:
    """Per stage: jobs, and the p50/p95 bucket bounds (ms) of the histogram."""
    return {stage: {"jobs": sum(b.values()), "p50_le_ms": histogram_quantile(b, 0.5),
                    "p95_le_ms": histogram_quantile(b, 0.95)} for stage, b in sorted(histograms.items())}


def collect_status() -> dict[str, Any]:
    # Platform-wide counts: one maintenance transaction, the system scope as the admin role (the
    # owner is filtered by the forced policies too and would count nothing).
    with admin_session(get_admin_session_factory()) as session:
        now = retention.db_now(session)
        return {
            "jobs_by_status": merged_counts(reports.jobs_by_status(session),
                                            retention.summarised_jobs_by_status(session)),
            "running_by_stage": reports.running_by_stage(session),
            "failures_by_code": merged_counts(reports.failures_by_code(session),
                                              retention.summarised_failures_by_code(session)),
            "intake": merged_counts(reports.inbox_by_status(session), retention.summarised_inbox_by_status(session)),
            "throughput_15min": reports.throughput_15min(session),
            "latency_s_15min": reports.latency_15min(session),
            "outbox_pending": reports.outbox_pending(session),
            "dead_letters": retention.unresolved_dead_letters(session),
            "coverage": coverage_counts(session, **stall_thresholds(get_settings())),
            "feedback": reports.feedback_report(session),
            "stage_timings_ms_24h": stage_timings(retention.stage_histograms(session, since=now - TIMINGS_WINDOW)),
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
