"""Bookkeeping retention: one bounded pruning run over the outbox, the model result documents, the
finished jobs, the inbox, the resolved dead letters and the old summaries.

A run computes its cutoffs once from the database clock, then goes round the passes one batch at
a time (``RetentionPolicy.batch_size`` rows, one transaction per batch, ``FOR UPDATE SKIP
LOCKED``) until every pass is caught up or ``max_run_s`` is spent; the next run carries on where
the cursors stopped. Each batch transaction takes the pruner's advisory lock: a run that finds
another one holding it stops (``busy``). The order inside a round matters only in one place: a
finished job is deleted only once the result-document pass has passed it (its document was
deleted first), so a job row always outlives its document.

Every transaction runs in the system scope and checks that it sees every tenant
(``db.engine.admin_session``): beat runs this as the workers' role (``enrich_worker``, like the
reconciler), ``enrich prune`` as the maintenance role (``enrich_admin``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta

import structlog
from sqlalchemy.orm import Session, sessionmaker

from db.engine import admin_session
from db.repositories import locks
from db.repositories import retention as rows
from tasks.io.blobs import BlobStore, result_key

log = structlog.get_logger(__name__)

ADVISORY_LOCK_KEY = 0x5EC0_0017  # one pruning batch at a time across every beat/worker/CLI process
PASSES = ("outbox", "result_documents", "jobs", "inbox", "dead_letters", "summaries")


@dataclass(frozen=True)
class RetentionPolicy:
    """How long each kind of bookkeeping is kept (``ENRICH_RETENTION__*``) and how a run is bounded."""

    outbox_keep: timedelta = timedelta(days=1)
    inbox_keep: timedelta = timedelta(days=7)
    jobs_keep: timedelta = timedelta(days=7)
    results_keep: timedelta = timedelta(hours=1)
    dead_letters_keep: timedelta = timedelta(days=30)
    summaries_keep: timedelta = timedelta(days=400)
    batch_size: int = 1000
    max_run_s: float = 60.0

    @classmethod
    def from_seconds(cls, *, outbox_keep_s: float, inbox_keep_s: float, jobs_keep_s: float, results_keep_s: float,
                     dead_letters_keep_s: float, summaries_keep_s: float, batch_size: int,
                     max_run_s: float) -> RetentionPolicy:
        """From the ``RetentionSettings`` fields (what beat passes the task as keyword arguments)."""
        if jobs_keep_s < results_keep_s:
            raise ValueError("jobs must be kept at least as long as their result documents")
        s = timedelta(seconds=1)
        return cls(outbox_keep=outbox_keep_s * s, inbox_keep=inbox_keep_s * s, jobs_keep=jobs_keep_s * s,
                   results_keep=results_keep_s * s, dead_letters_keep=dead_letters_keep_s * s,
                   summaries_keep=summaries_keep_s * s, batch_size=int(batch_size), max_run_s=float(max_run_s))


@dataclass(frozen=True)
class Cutoffs:
    """Everything older than these goes (each from one database clock reading at the start of a run)."""

    outbox: datetime
    results: datetime
    jobs: datetime
    inbox: datetime
    dead_letters: datetime
    summaries: datetime

    @classmethod
    def at(cls, now: datetime, policy: RetentionPolicy) -> Cutoffs:
        return cls(outbox=now - policy.outbox_keep, results=now - policy.results_keep, jobs=now - policy.jobs_keep,
                   inbox=now - policy.inbox_keep, dead_letters=now - policy.dead_letters_keep,
                   summaries=now - policy.summaries_keep)


@dataclass
class RetentionReport:
    """What one run removed, per pass (``inbox`` counts rows removed with their jobs too)."""

    deleted: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PASSES, 0))
    batches: int = 0
    elapsed_s: float = 0.0
    caught_up: bool = False  # every pass found nothing more to remove
    busy: bool = False  # another pruner held the lock

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class _Busy(Exception):
    """Another pruning batch holds the advisory lock."""


Batch = Callable[[sessionmaker[Session], BlobStore | None, RetentionPolicy, Cutoffs, RetentionReport], bool]
"""One batch of one pass: records what it removed in the report; True while more may be left."""


def _locked(session: Session) -> Session:
    if not locks.try_xact_lock(session, ADVISORY_LOCK_KEY):
        raise _Busy
    return session


def _outbox(factory, blobs, policy, cut, report) -> bool:  # noqa: ANN001
    with admin_session(factory) as s:
        n = rows.prune_outbox(_locked(s), published_before=cut.outbox, limit=policy.batch_size)
    report.deleted["outbox"] += n
    return n == policy.batch_size


def _dead_letters(factory, blobs, policy, cut, report) -> bool:  # noqa: ANN001
    with admin_session(factory) as s:
        n = rows.prune_dead_letters(_locked(s), resolved_before=cut.dead_letters, limit=policy.batch_size)
    report.deleted["dead_letters"] += n
    return n == policy.batch_size


def _result_documents(factory, blobs, policy, cut, report) -> bool:  # noqa: ANN001
    with admin_session(factory) as s:
        start = rows.get_cursor(_locked(s), rows.RESULTS_CURSOR)
        finished = rows.finished_jobs_after(s, start, finished_before=cut.results, limit=policy.batch_size)
    if not finished:
        return False
    keys = [result_key(j.id) for j in finished if j.ran_model]
    if keys:
        if blobs is None:
            raise RuntimeError("result documents are due for deletion but this run has no blob store")
        report.deleted["result_documents"] += blobs.delete(keys)  # outside any transaction: storage I/O
    last = finished[-1]
    with admin_session(factory) as s:
        rows.set_cursor(_locked(s), rows.RESULTS_CURSOR, rows.Cursor(last.finished_at, str(last.id)))
    return len(finished) == policy.batch_size


def _jobs(factory, blobs, policy, cut, report) -> bool:  # noqa: ANN001
    with admin_session(factory) as s:
        start = rows.get_cursor(_locked(s), rows.JOBS_CURSOR)
        until = rows.get_cursor(s, rows.RESULTS_CURSOR)
        batch = rows.prune_jobs(s, start, until=until, finished_before=cut.jobs, inbox_before=cut.inbox,
                                limit=policy.batch_size)
        if batch.end is not None:
            rows.set_cursor(s, rows.JOBS_CURSOR, batch.end)
    report.deleted["jobs"] += batch.deleted
    report.deleted["inbox"] += batch.inbox_deleted
    return batch.read == policy.batch_size


def _inbox(factory, blobs, policy, cut, report) -> bool:  # noqa: ANN001
    with admin_session(factory) as s:
        start = rows.get_cursor(_locked(s), rows.INBOX_CURSOR)
        batch = rows.prune_inbox(s, start, received_before=cut.inbox, limit=policy.batch_size)
        if batch.end is not None:
            rows.set_cursor(s, rows.INBOX_CURSOR, batch.end)
    report.deleted["inbox"] += batch.deleted
    return batch.read == policy.batch_size


def _summaries(factory, blobs, policy, cut, report) -> bool:  # noqa: ANN001
    with admin_session(factory) as s:
        n = rows.prune_summaries(_locked(s), hour_before=cut.summaries, limit=policy.batch_size)
    report.deleted["summaries"] += n
    return n > 0


BATCHES: dict[str, Batch] = {"outbox": _outbox, "result_documents": _result_documents, "jobs": _jobs,
                             "inbox": _inbox, "dead_letters": _dead_letters, "summaries": _summaries}


def database_now(factory: sessionmaker[Session]) -> datetime:
    with admin_session(factory) as s:
        return rows.db_now(s)


def run_retention(factory: sessionmaker[Session], blobs: BlobStore | None, policy: RetentionPolicy, *,
                  now: datetime | None = None, passes: tuple[str, ...] = PASSES,
                  on_batch: Callable[[RetentionReport], None] | None = None) -> RetentionReport:
    """One bounded run; ``now`` (default: the database clock) fixes the cutoffs for the whole run."""
    started = time.monotonic()
    report = RetentionReport()
    cut = Cutoffs.at(now or database_now(factory), policy)
    pending = [p for p in PASSES if p in passes]
    out_of_time = False
    try:
        while pending and not out_of_time:  # at least one batch, however small the budget
            for name in list(pending):
                if not BATCHES[name](factory, blobs, policy, cut, report):
                    pending.remove(name)
                report.batches += 1
                if on_batch is not None:
                    on_batch(report)
                if out_of_time := time.monotonic() - started >= policy.max_run_s:
                    break
    except _Busy:
        report.busy = True
    report.caught_up = not pending and not report.busy
    report.elapsed_s = round(time.monotonic() - started, 3)
    log.info("retention.ran", batches=report.batches, caught_up=report.caught_up, busy=report.busy,
             took_s=report.elapsed_s, **report.deleted)
    return report


def due(factory: sessionmaker[Session], policy: RetentionPolicy, *, now: datetime | None = None) -> dict[str, int]:
    """What a full catch-up would remove now (``enrich prune --dry-run``); removes nothing."""
    with admin_session(factory) as s:
        cut = Cutoffs.at(now or rows.db_now(s), policy)
        return rows.due_counts(s, outbox_before=cut.outbox, results_before=cut.results, jobs_before=cut.jobs,
                               inbox_before=cut.inbox, dead_letters_before=cut.dead_letters,
                               summaries_before=cut.summaries)
