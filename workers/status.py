"""``enrich status``: what the pipeline is doing, read from the database."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text

from workers.database import get_engine


def _optional(report: dict[str, Any], key: str, module: str, fn: str, session) -> None:  # noqa: ANN001
    import importlib

    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError:
        return
    report[key] = getattr(mod, fn)(session)


def collect_status() -> dict[str, Any]:
    from sqlalchemy.orm import Session

    from db.engine import set_system_scope

    engine = get_engine()
    report: dict[str, Any] = {}
    with engine.connect() as conn:
        # Platform-wide counts: the system scope of row-level security (a no-op for the owner role).
        conn.execute(text("SELECT set_config('enrich.scope', 'system', true)"))
        report["jobs_by_status"] = dict(conn.execute(text(
            "SELECT status, count(*) FROM enrichment_jobs GROUP BY status ORDER BY status")).all())
        report["running_by_stage"] = dict(conn.execute(text(
            "SELECT coalesce(stage, 'queued'), count(*) FROM enrichment_jobs WHERE status IN ('pending','running') "
            "GROUP BY 1 ORDER BY 1")).all())
        report["failures_by_code"] = dict(conn.execute(text(
            "SELECT error_code, count(*) FROM enrichment_jobs WHERE status = 'failed' GROUP BY 1 ORDER BY 2 DESC")).all())
        report["intake"] = dict(conn.execute(text(
            "SELECT status, count(*) FROM inbox_events GROUP BY status ORDER BY status")).all())
        row = conn.execute(text(
            "SELECT count(*) AS n, extract(epoch FROM max(finished_at) - min(created_at)) AS span "
            "FROM enrichment_jobs WHERE status = 'done' AND finished_at > now() - interval '15 minutes'")).one()
        report["throughput_15min"] = {"done": row.n,
                                      "events_per_s": round(row.n / float(row.span), 3) if row.n and row.span else 0.0}
        lat = conn.execute(text(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at)) AS p50,"
            "       percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at)) AS p95 "
            "FROM enrichment_jobs WHERE status = 'done' AND finished_at > now() - interval '15 minutes'")).one()
        report["latency_s_15min"] = {"p50": lat.p50, "p95": lat.p95}
        report["outbox_pending"] = conn.execute(text(
            "SELECT count(*) FROM outbox WHERE published_at IS NULL")).scalar_one()
        report["dead_letters"] = conn.execute(text("SELECT count(*) FROM dead_letters")).scalar_one()
    with Session(engine) as session:
        set_system_scope(session)
        _optional(report, "coverage", "tasks.pipeline.reconcile", "coverage_counts", session)
        _optional(report, "feedback", "tasks.feedback.report", "feedback_report", session)
    return report


def render_status(report: dict[str, Any]) -> str:
    lines = []
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
