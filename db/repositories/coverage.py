"""Coverage of the catalog by the active model versions, per product at its latest version.

Built on ``catalog.enrichment_status`` (migration 0002): one row per product, with its latest
job and whether a listing and an embedding of the active versions exist. Each row is classified
once here; the reconciler and ``enrich status`` read the classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import text
from sqlalchemy.orm import Session

# Classes: job_stalled, in_flight, job_failed_retryable, failed_permanently, missing_listing,
# missing_embedding, complete.
#
# A live job is stalled when nothing touched it for longer than its allowance: ``:stalled`` when a
# task holds its current stage (that task beats ``updated_at`` while it runs, so silence means it
# died), ``:queued`` when none does (never claimed, or handed on and waiting in the next stage's
# queue: a long backlog is not a death). The holder is read where ``tasks.pipeline.work.Claims``
# keeps it: ``work -> 'claims' ->> stage``.
_CLASSIFIED = """
    SELECT s.tenant_id, s.product_id, s.external_id, s.product_version, s.job_id, s.job_stage,
           CASE
             WHEN s.job_status IN ('pending', 'running') AND s.job_updated_at < now() - CASE
                    WHEN s.job_status = 'running' AND j.work -> 'claims' ->> s.job_stage IS NOT NULL
                      THEN :stalled ELSE :queued END
               THEN 'job_stalled'
             WHEN s.job_status IN ('pending', 'running') THEN 'in_flight'
             WHEN s.job_status = 'failed' AND s.retryable THEN 'job_failed_retryable'
             WHEN s.job_status = 'failed' THEN 'failed_permanently'
             WHEN s.has_listing IS FALSE THEN 'missing_listing'
             WHEN s.has_embedding IS FALSE THEN 'missing_embedding'
             ELSE 'complete'
           END AS reason
    FROM catalog.enrichment_status s
    LEFT JOIN public.enrichment_jobs j ON j.id = s.job_id
"""


@dataclass(frozen=True)
class ClassifiedProduct:
    tenant_id: str
    product_id: int
    external_id: str
    product_version: int
    reason: str
    job_id: int | None
    job_stage: str | None


def products_in(session: Session, reasons: list[str], *, stalled_after: timedelta, queued_after: timedelta,
                limit: int, tenant_id: str | None = None) -> list[ClassifiedProduct]:
    """Products whose class is one of ``reasons``, oldest product id first. ``stalled_after``: the
    allowance of a claimed stage since its last heartbeat; ``queued_after``: of one no task holds."""
    rows = session.execute(
        text(f"SELECT * FROM ({_CLASSIFIED}) c WHERE c.reason = ANY(CAST(:reasons AS text[])) "
             "AND (CAST(:tenant AS text) IS NULL OR c.tenant_id = CAST(:tenant AS text)) "
             "ORDER BY c.product_id LIMIT :limit"),
        {"stalled": stalled_after, "queued": queued_after, "reasons": reasons, "tenant": tenant_id, "limit": limit},
    )
    return [ClassifiedProduct(r.tenant_id, r.product_id, r.external_id, r.product_version, r.reason,
                              r.job_id, r.job_stage) for r in rows]


def counts_by_class(session: Session, *, stalled_after: timedelta, queued_after: timedelta) -> dict[str, int]:
    return {str(k): int(v) for k, v in session.execute(
        text(f"SELECT c.reason, count(*) FROM ({_CLASSIFIED}) c GROUP BY c.reason"),
        {"stalled": stalled_after, "queued": queued_after},
    ).tuples().all()}
