"""Read-only counts behind ``enrich status``: the pipeline's jobs, intake, outbox, dead letters,
and merchant feedback with the retrain datasets.

Platform-wide by nature: callers run these in the system scope of row-level security.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session


def _counts(session: Session, sql: str) -> dict[Any, int]:
    """``{key: count}`` from a two-column ``SELECT key, count(*) …``."""
    return dict(session.execute(text(sql)).tuples().all())


def jobs_by_status(session: Session) -> dict[str, int]:
    return _counts(session, "SELECT status, count(*) FROM enrichment_jobs GROUP BY status ORDER BY status")


def running_by_stage(session: Session) -> dict[str, int]:
    """Unfinished jobs by current stage (``queued``: not yet claimed by any stage)."""
    return _counts(session, "SELECT coalesce(stage, 'queued'), count(*) FROM enrichment_jobs "
                            "WHERE status IN ('pending','running') GROUP BY 1 ORDER BY 1")


def failures_by_code(session: Session) -> dict[str, int]:
    """Failed jobs by error code, most frequent first."""
    return _counts(session, "SELECT error_code, count(*) FROM enrichment_jobs WHERE status = 'failed' "
                            "GROUP BY 1 ORDER BY 2 DESC")


def inbox_by_status(session: Session) -> dict[str, int]:
    return _counts(session, "SELECT status, count(*) FROM inbox_events GROUP BY status ORDER BY status")


def throughput_15min(session: Session) -> dict[str, Any]:
    """Jobs done in the last 15 minutes and the rate from the first one's creation to the last finish."""
    row = session.execute(text(
        "SELECT count(*) AS n, extract(epoch FROM max(finished_at) - min(created_at)) AS span "
        "FROM enrichment_jobs WHERE status = 'done' AND finished_at > now() - interval '15 minutes'")).one()
    return {"done": row.n, "events_per_s": round(row.n / float(row.span), 3) if row.n and row.span else 0.0}


def latency_15min(session: Session) -> dict[str, float | None]:
    """p50/p95 seconds from job creation to finish, over the jobs done in the last 15 minutes."""
    row = session.execute(text(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at)) AS p50,"
        "       percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at)) AS p95 "
        "FROM enrichment_jobs WHERE status = 'done' AND finished_at > now() - interval '15 minutes'")).one()
    return {"p50": row.p50, "p95": row.p95}


def outbox_pending(session: Session) -> int:
    return session.execute(text("SELECT count(*) FROM outbox WHERE published_at IS NULL")).scalar_one()


def dead_letters(session: Session) -> int:
    return session.execute(text("SELECT count(*) FROM dead_letters")).scalar_one()


def _field_rates(session: Session, total: int, limit: int) -> dict[str, float]:
    """Share of reviews that corrected each field (most corrected first)."""
    if not total:
        return {}
    rows = session.execute(text(
        "SELECT field AS k, count(DISTINCT feedback_id) AS n FROM field_errors GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT :l"
    ), {"l": limit}).all()
    return {r.k: round(r.n / total, 4) for r in rows}


def feedback_report(session: Session, *, fields: int = 10, datasets: int = 3) -> dict[str, Any]:
    """Reviews by decision, error rates by field (the ``fields`` most corrected) and by category,
    and the ``datasets`` newest training datasets."""
    by_decision = _counts(session, "SELECT decision, count(*) FROM review_feedback "
                                   "GROUP BY decision ORDER BY decision")
    total = int(sum(by_decision.values()))
    reviewed_by_category = _counts(session, "SELECT l.category, count(*) FROM review_feedback f "
                                            "JOIN listings l ON l.id = f.listing_id GROUP BY 1")
    errors_by_category = _counts(session, "SELECT category, count(DISTINCT feedback_id) FROM field_errors "
                                          "GROUP BY 1")
    last = session.execute(text(
        "SELECT name, uri, created_at, watermark_feedback_id AS watermark, "
        "coalesce((manifest -> 'counts' ->> 'pairs')::int, 0) AS pairs "
        "FROM training_datasets ORDER BY id DESC LIMIT :n"), {"n": datasets}).all()
    return {
        "reviews": total,
        "by_decision": by_decision,
        "error_rate_by_field": _field_rates(session, total, fields),
        "error_rate_by_category": {c: round(errors_by_category.get(c, 0) / n, 4)
                                   for c, n in sorted(reviewed_by_category.items())},
        "last_datasets": [{"name": r.name, "pairs": r.pairs, "watermark": r.watermark, "uri": r.uri,
                           "created_at": r.created_at.isoformat()} for r in last],
    }
