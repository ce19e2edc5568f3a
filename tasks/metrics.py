"""Prometheus metrics of the pipeline: every definition here, recorded from thin hooks.

The metrics are built on first use, not at import: a worker chooses multiprocess mode (a
``PROMETHEUS_MULTIPROC_DIR`` for its prefork children, ``workers.metrics``) before anything
records, and a process that never serves metrics records into the in-process default registry at
no cost. Labels are bounded sets (stage, outcome, error code, event kind, model kind, queue name);
no tenant, product or job id is ever a label value.

Counts that depend on a transaction (jobs finished, stage timings, queue wait) are recorded by
``on_commit``: they move only once the session that decided them committed, so a rolled-back
stage retried later is counted once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import event as orm_event
from sqlalchemy.orm import Session

# Seconds: from a cheap stage (a few ms) to a model load or a slow download (minutes).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# The sub-stage timings the stages hand over (``timings`` of jobs.hand_off / jobs.finish, ms).
STAGE_TIMINGS = ("fetch", "dedup", "ground", "describe", "verify", "embed", "persist")


class Metrics:
    """The metric objects; one instance per process (``metrics()``)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.events_received = Counter("catalog_events_received_total", "Domain events consumed by the intake.",
                                       ["kind"])
        self.events_accepted = Counter("catalog_events_accepted_total",
                                       "Events the intake acted on (product: a new job; review: applied).", ["kind"])
        self.events_duplicate = Counter("catalog_events_duplicate_total",
                                        "Events already seen (inbox): nothing done again.", ["kind"])
        self.events_refused = Counter("catalog_events_refused_total", "Events refused, by error code.",
                                      ["kind", "code"])
        self.jobs_finished = Counter("catalog_jobs_finished_total",
                                     "Enrichment jobs ended: done, failed (with its code) or superseded.",
                                     ["outcome", "code"])
        self.stage_duration = Histogram("catalog_stage_duration_seconds",
                                        "Time spent in one pipeline step of a job (fetch, dedup, ground, describe, "
                                        "verify, embed, persist).", ["stage"], buckets=DURATION_BUCKETS)
        self.task_duration = Histogram("catalog_stage_task_duration_seconds",
                                       "Wall time of one stage task run (fetch, model, persist), claim to relay.",
                                       ["stage"], buckets=DURATION_BUCKETS)
        self.queue_wait = Histogram("catalog_stage_queue_wait_seconds",
                                    "From a stage's hand-off (or the job's creation) to its first claim.",
                                    ["stage"], buckets=WAIT_BUCKETS)
        self.batch_size = Histogram("catalog_model_batch_size", "Products per GPU micro-batch.",
                                    buckets=BATCH_SIZE_BUCKETS)
        self.batch_fill_wait = Histogram("catalog_model_batch_fill_wait_seconds",
                                         "From a micro-batch's first item to the batch starting.",
                                         buckets=DURATION_BUCKETS)
        self.model_load = Histogram("catalog_model_load_seconds", "Time to load one model (detector, vlm, clip).",
                                    ["kind"], buckets=DURATION_BUCKETS)
        self.outbox_relayed = Counter("catalog_outbox_relayed_total", "Outbox rows published by a relay.", ["kind"])
        self.outbox_relay_lag = Histogram("catalog_outbox_relay_lag_seconds",
                                          "From an outbox row's commit to its publishing.", ["kind"],
                                          buckets=WAIT_BUCKETS)
        self.reconciler_runs = Counter("catalog_reconciler_runs_total", "Coverage reconciler passes.")
        self.reconciler_findings = Counter("catalog_reconciler_findings_total",
                                           "Products the reconciler re-dispatched, by reason.", ["reason"])
        self.pair_builder_runs = Counter("catalog_retrain_pair_runs_total",
                                         "DPO pair-builder runs, by status (built, empty, skipped …).", ["status"])
        self.pairs_built = Counter("catalog_retrain_pairs_total", "Preference pairs written by the pair builder.")


@lru_cache(maxsize=1)
def metrics() -> Metrics:
    return Metrics()


# ---- after-commit recording -------------------------------------------------------------------
_PENDING = "metrics.pending"


def on_commit(session: Session, record: Callable[[], None]) -> None:
    """Run ``record`` once ``session``'s transaction commits; dropped on rollback."""
    session.info.setdefault(_PENDING, []).append(record)


@orm_event.listens_for(Session, "after_commit")
def _record_committed(session: Session) -> None:
    for record in session.info.pop(_PENDING, []):
        try:
            record()
        except Exception:  # noqa: BLE001, S110 - a metric never fails a committed unit of work
            pass


@orm_event.listens_for(Session, "after_rollback")
def _drop_rolled_back(session: Session) -> None:
    session.info.pop(_PENDING, None)


# ---- hooks -------------------------------------------------------------------------------------
def event_received(kind: str) -> None:
    metrics().events_received.labels(kind).inc()


def event_outcome(kind: str, outcome: str, code: str | None = None) -> None:
    """``outcome``: accepted, duplicate or refused (with the error code)."""
    m = metrics()
    if outcome == "accepted":
        m.events_accepted.labels(kind).inc()
    elif outcome == "duplicate":
        m.events_duplicate.labels(kind).inc()
    else:
        m.events_refused.labels(kind, code or "unknown").inc()


def job_finished(session: Session, outcome: str, code: str | None = None) -> None:
    on_commit(session, lambda: metrics().jobs_finished.labels(outcome, code or "").inc())


def stage_timings(session: Session, timings_ms: Mapping[str, float] | None) -> None:
    known = {k: v for k, v in (timings_ms or {}).items() if k in STAGE_TIMINGS and v >= 0}
    if known:
        on_commit(session, lambda: [metrics().stage_duration.labels(k).observe(v / 1000) for k, v in known.items()])


def queue_wait(session: Session, stage: str, since: datetime | None) -> None:
    if since is None:
        return
    waited = (datetime.now(UTC) - since).total_seconds()
    on_commit(session, lambda: metrics().queue_wait.labels(stage).observe(max(0.0, waited)))


def task_ran(stage: str, seconds: float) -> None:
    metrics().task_duration.labels(stage).observe(seconds)


def batch_ran(size: int, fill_wait_s: float) -> None:
    """``MicroBatcher``'s ``on_batch`` callback (the GPU worker's model thread)."""
    m = metrics()
    m.batch_size.observe(size)
    m.batch_fill_wait.observe(fill_wait_s)


def model_loaded(kind: str, seconds: float) -> None:
    metrics().model_load.labels(kind).observe(seconds)


def outbox_relayed(routing_key: str, created_at: datetime | None) -> None:
    kind = "task" if routing_key.startswith("task:") else "event"
    m = metrics()
    m.outbox_relayed.labels(kind).inc()
    if created_at is not None:
        m.outbox_relay_lag.labels(kind).observe(max(0.0, (datetime.now(UTC) - created_at).total_seconds()))


def reconciled(reasons: list[str]) -> None:
    m = metrics()
    m.reconciler_runs.inc()
    for reason in reasons:
        m.reconciler_findings.labels(reason).inc()


def pairs_built(status: str, pairs: int) -> None:
    m = metrics()
    m.pair_builder_runs.labels(status).inc()
    if pairs > 0:
        m.pairs_built.inc(pairs)


def timed_loads(server: Any) -> Callable[[], None]:
    """Wrap a ``ModelServer.prepare``: each model still to load is loaded (and timed) here first."""
    import time

    def prepare() -> None:
        bundle = server.serving().bundle
        for kind, wrapper in (("detector", bundle.grounder), ("clip", bundle.embedder), ("vlm", bundle.generator)):
            if not getattr(wrapper, "loaded", True):
                started = time.perf_counter()
                wrapper.load()
                model_loaded(kind, time.perf_counter() - started)
        server.prepare()

    return prepare
