"""Bookkeeping retention: the pruning statements, the cursors they advance, the hourly summaries
they fold deleted rows into, and the figures ``enrich status`` reads back from those summaries.

Every pruning statement handles one bounded batch (``limit`` rows, ``FOR UPDATE SKIP LOCKED``) in
the caller's transaction, so no lock or transaction outlives one batch. Cross-tenant by nature:
callers run in the system scope (``db.engine.admin_session``).

Two inputs are read in order behind a cursor rather than scanned from their oldest row, because
some of their old rows are kept on purpose and would otherwise be re-read by every batch:

* finished jobs, by (finished_at, id): a product's newest job is kept whatever its age (the
  reconciler's ``catalog.enrichment_status`` classifies the product by it and re-queues from
  its image references), so a batch deletes, among the jobs of the products it reads, every
  finished job at or behind the batch end that a newer job of the same product has replaced.
  A job kept as the newest is deleted when the cursor reaches a later job of that product.
* inbox events, by (received_at, event_id): an event id is kept while its job row is kept (the
  job references it) or a review recorded from it exists (reviews are kept: the replay of an old
  review must stay a no-op). The job batch deletes the inbox row of each job it deletes once that
  row is past the idempotency window; the inbox batch deletes rows that never had a job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

HISTOGRAM_BOUNDS_MS: tuple[float, ...] = tuple(float(b) for b in (
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 300_000, 900_000, 3_600_000, math.inf))
"""Upper bounds of the stage-timing histogram buckets (ms); a timing goes to the first bound >= it."""
TOTAL_STAGE = "total"
"""The histogram of a job's whole life, created → finished, beside its per-stage timings."""

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
JOBS_CURSOR, RESULTS_CURSOR, INBOX_CURSOR = "jobs", "results", "inbox"
_START_KEY = {JOBS_CURSOR: "0", RESULTS_CURSOR: "0", INBOX_CURSOR: "00000000-0000-0000-0000-000000000000"}


@dataclass(frozen=True)
class Cursor:
    """A position in an ordered input: its time column and the tie-breaking key (as text)."""

    at: datetime
    key: str


@dataclass(frozen=True)
class FinishedJob:
    id: int
    finished_at: datetime
    ran_model: bool  # the model stage was claimed: a result document may exist


@dataclass(frozen=True)
class BatchResult:
    """What one cursor batch read (``end``: the cursor to store; None when nothing was left) and deleted."""

    end: Cursor | None
    read: int
    deleted: int
    inbox_deleted: int = 0


def db_now(session: Session) -> datetime:
    return session.execute(text("SELECT now()")).scalar_one()


def get_cursor(session: Session, name: str) -> Cursor:
    row = session.execute(text("SELECT position_at, position_key FROM retention_cursors WHERE name = :n"),
                          {"n": name}).one_or_none()
    return Cursor(row.position_at, row.position_key) if row else Cursor(EPOCH, _START_KEY[name])


def set_cursor(session: Session, name: str, cursor: Cursor) -> None:
    """Store ``cursor``; never moves a cursor back in time (a slower concurrent run may finish last)."""
    session.execute(text(
        "INSERT INTO retention_cursors (name, position_at, position_key) VALUES (:n, :at, :key) "
        "ON CONFLICT (name) DO UPDATE SET position_at = excluded.position_at, position_key = excluded.position_key, "
        "updated_at = now() WHERE excluded.position_at >= retention_cursors.position_at"),
        {"n": name, "at": cursor.at, "key": cursor.key})


def _delete_older(session: Session, table: str, column: str, before: datetime, limit: int) -> int:
    """Delete up to ``limit`` rows of ``table`` whose ``column`` is before ``before``, oldest first
    (a NULL ``column`` never qualifies)."""
    return session.execute(text(f"""
        WITH doomed AS (
            SELECT id FROM {table} WHERE {column} < :before
            ORDER BY {column} LIMIT :n FOR UPDATE SKIP LOCKED)
        DELETE FROM {table} x USING doomed d WHERE x.id = d.id"""), {"before": before, "n": limit}).rowcount


def prune_outbox(session: Session, *, published_before: datetime, limit: int) -> int:
    """Delete up to ``limit`` outbox rows published before ``published_before`` (never an unpublished one)."""
    return _delete_older(session, "outbox", "published_at", published_before, limit)


def finished_jobs_after(session: Session, cursor: Cursor, *, finished_before: datetime,
                        limit: int) -> list[FinishedJob]:
    """The next ``limit`` finished jobs after ``cursor`` that finished before ``finished_before``."""
    rows = session.execute(text("""
        SELECT id, finished_at, (work ? 'result_uri' OR attempts ? 'model') AS ran_model FROM enrichment_jobs
        WHERE finished_at IS NOT NULL AND finished_at < :before
          AND (finished_at, id) > (CAST(:at AS timestamptz), CAST(:key AS bigint))
        ORDER BY finished_at, id LIMIT :n"""),
        {"before": finished_before, "at": cursor.at, "key": cursor.key, "n": limit}).all()
    return [FinishedJob(r.id, r.finished_at, bool(r.ran_model)) for r in rows]


_PRUNE_JOBS = """
WITH batch AS (
    SELECT id, product_id, finished_at FROM enrichment_jobs
    WHERE finished_at IS NOT NULL AND finished_at < :before
      AND (finished_at, id) > (CAST(:at AS timestamptz), CAST(:key AS bigint))
      AND (finished_at, id) <= (CAST(:until_at AS timestamptz), CAST(:until_key AS bigint))
    ORDER BY finished_at, id LIMIT :n
), last AS (
    SELECT finished_at, id FROM batch ORDER BY finished_at DESC, id DESC LIMIT 1
), doomed AS (
    SELECT j.id FROM enrichment_jobs j, last
    WHERE j.product_id IN (SELECT product_id FROM batch)
      AND j.finished_at IS NOT NULL AND (j.finished_at, j.id) <= (last.finished_at, last.id)
      AND EXISTS (SELECT 1 FROM enrichment_jobs n WHERE n.product_id = j.product_id AND n.id > j.id)
    FOR UPDATE OF j SKIP LOCKED
), gone AS (
    DELETE FROM enrichment_jobs j USING doomed d WHERE j.id = d.id
    RETURNING j.event_id, j.status, j.error_code, j.created_at, j.finished_at, j.timings_ms
), counted AS (
    INSERT INTO job_summaries (hour, status, error_code, jobs)
    SELECT date_trunc('hour', finished_at, 'UTC'), status, coalesce(error_code, ''), count(*)
    FROM gone GROUP BY 1, 2, 3
    ON CONFLICT (hour, status, error_code) DO UPDATE SET jobs = job_summaries.jobs + excluded.jobs
), timings AS (
    SELECT date_trunc('hour', g.finished_at, 'UTC') AS hour, t.stage, t.ms,
           (SELECT min(b) FROM unnest(CAST(:bounds AS float8[])) AS b WHERE t.ms <= b) AS le_ms
    FROM gone g CROSS JOIN LATERAL (
        SELECT e.key AS stage, CAST(e.value AS float8) AS ms FROM jsonb_each(g.timings_ms) e
        WHERE jsonb_typeof(e.value) = 'number'
        UNION ALL
        SELECT :total, extract(epoch FROM g.finished_at - g.created_at) * 1000) t
), binned AS (
    INSERT INTO job_stage_timings (hour, stage, le_ms, jobs, sum_ms)
    SELECT hour, left(stage, 32), le_ms, count(*), sum(ms) FROM timings GROUP BY 1, 2, 3
    ON CONFLICT (hour, stage, le_ms) DO UPDATE
        SET jobs = job_stage_timings.jobs + excluded.jobs, sum_ms = job_stage_timings.sum_ms + excluded.sum_ms
), inbox_gone AS (
    DELETE FROM inbox_events i USING gone g
    WHERE i.event_id = g.event_id AND i.received_at < :inbox_before
      AND NOT EXISTS (SELECT 1 FROM review_feedback f WHERE f.event_id = i.event_id)
    RETURNING i.received_at, i.event_type, i.status
), inbox_counted AS (
    INSERT INTO inbox_summaries (hour, event_type, status, events)
    SELECT date_trunc('hour', received_at, 'UTC'), event_type, status, count(*) FROM inbox_gone GROUP BY 1, 2, 3
    ON CONFLICT (hour, event_type, status) DO UPDATE SET events = inbox_summaries.events + excluded.events
)
SELECT (SELECT finished_at FROM last) AS end_at, (SELECT id FROM last) AS end_id, (SELECT count(*) FROM batch) AS read,
       (SELECT count(*) FROM gone) AS jobs, (SELECT count(*) FROM inbox_gone) AS inbox
"""


def prune_jobs(session: Session, cursor: Cursor, *, until: Cursor, finished_before: datetime,
               inbox_before: datetime, limit: int) -> BatchResult:
    """Read the next ``limit`` finished jobs after ``cursor`` (and not past ``until``, the
    result-document pass's position, nor ``finished_before``); delete every finished job of their
    products at or behind the batch end that a newer job replaced, folding each into the hourly
    summaries and histograms, and its inbox row when that is older than ``inbox_before``."""
    row = session.execute(text(_PRUNE_JOBS), {
        "before": finished_before, "at": cursor.at, "key": cursor.key, "until_at": until.at,
        "until_key": until.key, "n": limit, "bounds": list(HISTOGRAM_BOUNDS_MS), "total": TOTAL_STAGE,
        "inbox_before": inbox_before}).one()
    end = Cursor(row.end_at, str(row.end_id)) if row.end_id is not None else None
    return BatchResult(end, int(row.read), int(row.jobs), int(row.inbox))


_PRUNE_INBOX = """
WITH batch AS (
    SELECT received_at, event_id FROM inbox_events
    WHERE received_at < :before AND (received_at, event_id) > (CAST(:at AS timestamptz), CAST(:key AS uuid))
    ORDER BY received_at, event_id LIMIT :n
), last AS (
    SELECT received_at, event_id FROM batch ORDER BY received_at DESC, event_id DESC LIMIT 1
), doomed AS (
    SELECT i.event_id FROM inbox_events i JOIN batch b ON b.event_id = i.event_id
    WHERE NOT EXISTS (SELECT 1 FROM enrichment_jobs j WHERE j.event_id = i.event_id)
      AND NOT EXISTS (SELECT 1 FROM review_feedback f WHERE f.event_id = i.event_id)
    FOR UPDATE OF i SKIP LOCKED
), gone AS (
    DELETE FROM inbox_events i USING doomed d WHERE i.event_id = d.event_id
    RETURNING i.received_at, i.event_type, i.status
), counted AS (
    INSERT INTO inbox_summaries (hour, event_type, status, events)
    SELECT date_trunc('hour', received_at, 'UTC'), event_type, status, count(*) FROM gone GROUP BY 1, 2, 3
    ON CONFLICT (hour, event_type, status) DO UPDATE SET events = inbox_summaries.events + excluded.events
)
SELECT (SELECT received_at FROM last) AS end_at, (SELECT CAST(event_id AS text) FROM last) AS end_key,
       (SELECT count(*) FROM batch) AS read, (SELECT count(*) FROM gone) AS events
"""


def prune_inbox(session: Session, cursor: Cursor, *, received_before: datetime, limit: int) -> BatchResult:
    """Read the next ``limit`` inbox rows after ``cursor`` received before ``received_before`` and
    delete those no job row references and no review was recorded from, counted into the hourly
    intake summaries."""
    row = session.execute(text(_PRUNE_INBOX), {"before": received_before, "at": cursor.at, "key": cursor.key,
                                               "n": limit}).one()
    end = Cursor(row.end_at, row.end_key) if row.end_key is not None else None
    return BatchResult(end, int(row.read), int(row.events))


def prune_dead_letters(session: Session, *, resolved_before: datetime, limit: int) -> int:
    """Delete up to ``limit`` dead letters resolved before ``resolved_before`` (never an unresolved one)."""
    return _delete_older(session, "dead_letters", "resolved_at", resolved_before, limit)


SUMMARY_TABLES = ("job_summaries", "job_stage_timings", "inbox_summaries")


def prune_summaries(session: Session, *, hour_before: datetime, limit: int) -> int:
    """Delete up to ``limit`` rows of each summary table whose hour is before ``hour_before``."""
    deleted = 0
    for table in SUMMARY_TABLES:
        deleted += session.execute(text(
            f"DELETE FROM {table} WHERE ctid IN (SELECT ctid FROM {table} WHERE hour < :before "
            "LIMIT :n FOR UPDATE SKIP LOCKED)"), {"before": hour_before, "n": limit}).rowcount
    return deleted


# ---------------------------------------------------------------- what is due (enrich prune --dry-run)

def due_counts(session: Session, *, outbox_before: datetime, results_before: datetime, jobs_before: datetime,
               inbox_before: datetime, dead_letters_before: datetime, summaries_before: datetime) -> dict[str, int]:
    """How many rows (and result documents) a full catch-up would remove now; deletes nothing."""
    results = get_cursor(session, RESULTS_CURSOR)
    jobs_until = min(jobs_before, results_before)
    row = session.execute(text("""
        SELECT
          (SELECT count(*) FROM outbox WHERE published_at < :outbox) AS outbox,
          (SELECT count(*) FROM enrichment_jobs WHERE finished_at IS NOT NULL AND finished_at < :results
             AND (finished_at, id) > (CAST(:r_at AS timestamptz), CAST(:r_key AS bigint))
             AND (work ? 'result_uri' OR attempts ? 'model')) AS result_documents,
          (SELECT count(*) FROM enrichment_jobs j WHERE j.finished_at IS NOT NULL AND j.finished_at < :jobs
             AND EXISTS (SELECT 1 FROM enrichment_jobs n WHERE n.product_id = j.product_id AND n.id > j.id)) AS jobs,
          (SELECT count(*) FROM inbox_events i WHERE i.received_at < :inbox
             AND NOT EXISTS (SELECT 1 FROM review_feedback f WHERE f.event_id = i.event_id)
             AND NOT EXISTS (SELECT 1 FROM enrichment_jobs j WHERE j.event_id = i.event_id
                             AND NOT (j.finished_at IS NOT NULL AND j.finished_at < :jobs AND EXISTS (
                                 SELECT 1 FROM enrichment_jobs n WHERE n.product_id = j.product_id AND n.id > j.id))))
            AS inbox,
          (SELECT count(*) FROM dead_letters WHERE resolved_at < :dead) AS dead_letters,
          (SELECT count(*) FROM job_summaries WHERE hour < :summaries)
            + (SELECT count(*) FROM job_stage_timings WHERE hour < :summaries)
            + (SELECT count(*) FROM inbox_summaries WHERE hour < :summaries) AS summaries
    """), {"outbox": outbox_before, "results": results_before, "r_at": results.at, "r_key": results.key,
           "jobs": jobs_until, "inbox": inbox_before, "dead": dead_letters_before,
           "summaries": summaries_before}).one()
    return {k: int(v) for k, v in row._mapping.items()}


# ---------------------------------------------------------------- enrich status: history + live rows

def _sums(session: Session, sql: str, params: dict[str, Any] | None = None) -> dict[str, int]:
    return {str(k): int(v) for k, v in session.execute(text(sql), params or {}).tuples().all()}


def summarised_jobs_by_status(session: Session) -> dict[str, int]:
    """Pruned jobs by final status (the live rows are ``reports.jobs_by_status``)."""
    return _sums(session, "SELECT status, sum(jobs) FROM job_summaries GROUP BY status")


def summarised_failures_by_code(session: Session) -> dict[str, int]:
    return _sums(session, "SELECT error_code, sum(jobs) FROM job_summaries WHERE status = 'failed' "
                          "GROUP BY error_code")


def summarised_inbox_by_status(session: Session) -> dict[str, int]:
    return _sums(session, "SELECT status, sum(events) FROM inbox_summaries GROUP BY status")


def unresolved_dead_letters(session: Session) -> int:
    return session.execute(text("SELECT count(*) FROM dead_letters WHERE resolved_at IS NULL")).scalar_one()


def stage_histograms(session: Session, *, since: datetime) -> dict[str, dict[float, int]]:
    """Per stage, {bucket upper bound ms: jobs} of every job finished since ``since``: the pruned
    ones from ``job_stage_timings`` (by the hour they finished in) plus the live rows, binned alike."""
    rows = session.execute(text("""
        WITH live AS (
            SELECT t.stage, t.ms FROM enrichment_jobs j CROSS JOIN LATERAL (
                SELECT e.key AS stage, CAST(e.value AS float8) AS ms FROM jsonb_each(j.timings_ms) e
                WHERE jsonb_typeof(e.value) = 'number'
                UNION ALL
                SELECT :total, extract(epoch FROM j.finished_at - j.created_at) * 1000) t
            WHERE j.finished_at IS NOT NULL AND j.finished_at >= :since
        )
        SELECT stage, le_ms, sum(jobs) AS jobs FROM (
            SELECT left(stage, 32) AS stage,
                   (SELECT min(b) FROM unnest(CAST(:bounds AS float8[])) AS b WHERE ms <= b) AS le_ms, 1 AS jobs
            FROM live
            UNION ALL
            SELECT stage, le_ms, jobs FROM job_stage_timings
            WHERE hour >= date_trunc('hour', CAST(:since AS timestamptz), 'UTC')
        ) x GROUP BY stage, le_ms ORDER BY stage, le_ms"""),
        {"since": since, "bounds": list(HISTOGRAM_BOUNDS_MS), "total": TOTAL_STAGE}).all()
    out: dict[str, dict[float, int]] = {}
    for r in rows:
        out.setdefault(r.stage, {})[float(r.le_ms)] = int(r.jobs)
    return out
