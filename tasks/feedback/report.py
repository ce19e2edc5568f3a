"""What ``enrich status`` shows about merchant feedback and the retrain datasets."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session



def _field_rates(session: Session, total: int, limit: int) -> dict[str, float]:
    """Share of reviews that corrected each field (most corrected first)."""
    if not total:
        return {}
    rows = session.execute(text(
        "SELECT field AS k, count(DISTINCT feedback_id) AS n FROM field_errors GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT :l"
    ), {"l": limit}).all()
    return {r.k: round(r.n / total, 4) for r in rows}


def feedback_report(session: Session, *, fields: int = 10, datasets: int = 3) -> dict[str, Any]:
    by_decision = dict(session.execute(text(
        "SELECT decision, count(*) FROM review_feedback GROUP BY decision ORDER BY decision")).tuples().all())
    total = int(sum(by_decision.values()))
    reviewed_by_category = dict(session.execute(text(
        "SELECT l.category, count(*) FROM review_feedback f JOIN listings l ON l.id = f.listing_id "
        "GROUP BY 1")).tuples().all())
    errors_by_category = dict(session.execute(text(
        "SELECT category, count(DISTINCT feedback_id) FROM field_errors GROUP BY 1")).tuples().all())
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
