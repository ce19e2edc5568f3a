"""Sustained run (issue 17): product events through the real broker to real worker processes with
retention active, sampling bookkeeping table sizes and hot-statement latencies as it goes.

An embeddings-only tenant (``ENRICH_ENRICHMENT__TENANTS``: dedup + embeddings, tiny profile) keeps a
catalogue of ``--products`` products, each updated again and again (event ``i`` is product
``i % products`` at version ``i // products + 1``; the photos cycle through ``--photos`` real
photos of the shared dataset, distinct products sharing a photo are exact duplicates). Because each
product gets newer versions, its older jobs (and their inbox rows) become prunable, which is what a
catalogue under a steady stream of updates looks like.

Retention runs as in production, as the ``catalog.prune`` task on the cpu worker: beat schedules it
with the settings' windows (the shortest the settings allow: outbox and result documents 60 s,
inbox and jobs 1 h), and this script sends the same task every ``--prune-every-s`` seconds with
compressed windows (``--keep-s`` for inbox and jobs, 60 s for outbox and results), because the
settings do not allow inbox and job windows below an hour and the run is shorter than that.

Every ``--sample-every`` answered events it records table rows and sizes and times the hot
statements with the runtime role: inbox insert (committed, probe tenant), stage claim (a probe job
claimed in a rolled-back transaction), outbox relay lock (``lock_pending`` of 20 rows, rolled back)
and the reconcile scan (``coverage.products_in``, limit 1000).

    nice -n 5 .venv/bin/python infra/bench/run_sustained.py --events 50000 --products 5000 \\
        --stop-publishing-at 15:33 --out /tmp/sustained.json

Needs RabbitMQ on 127.0.0.1:5672. Random weights (tiny profile): the vectors measure work, not quality.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TENANT, PROBE = "sustained", "sustained-probe"
TABLES = ("inbox_events", "enrichment_jobs", "outbox", "dead_letters", "job_summaries", "products", "images",
          "listings", "embeddings", "photo_embeddings")
STATEMENTS = ("inbox insert", "stage claim", "outbox relay lock", "reconcile scan")


def log(message: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {message}", flush=True)


def photos(n: int) -> list[tuple[Path, str]]:
    root = REPO.parent / "shared" / "datasets" / "clothing-small"
    with open(root / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [(root / r["path"], r["category"]) for r in rows[:n]]


@dataclass
class Sample:
    answered: int
    published: int
    t_s: float
    rows: dict[str, int]
    mib: dict[str, float]
    result_docs: int
    p50: dict[str, float]
    p95: dict[str, float]


@dataclass
class Answers:
    """What the backend's queue received (product.indexed / listing.failed), by causation id."""

    seen: set[str] = field(default_factory=set)
    failed: int = 0
    reconnects: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self) -> int:
        with self.lock:
            return len(self.seen)


def broker_errors() -> tuple[type[BaseException], ...]:
    """What a broker restart raises in pika: the connection or channel goes away under us."""
    import pika.exceptions as pe

    return (pe.AMQPConnectionError, pe.AMQPChannelError, pe.StreamLostError, ConnectionError, OSError)


def connect(retry_for_s: float = 300.0) -> Any:
    """A pika connection, retried while the broker is down (a restart takes seconds; give up after a while)."""
    import pika

    from tests.integration.harness import AMQP_URL

    deadline = time.monotonic() + retry_for_s
    while True:
        try:
            return pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        except broker_errors() as exc:
            if time.monotonic() > deadline:
                raise
            log(f"broker unreachable ({type(exc).__name__}); retrying")
            time.sleep(2.0)


def consume(namespace: str, answers: Answers, stop: threading.Event) -> None:
    """Count the answers, reconnecting when the broker restarts (the answer queue is durable, so what arrived
    while we were away is still there; an answer redelivered after a lost ack is counted once, by causation id)."""

    def on_message(channel: Any, method: Any, _props: Any, body: bytes) -> None:
        msg = json.loads(body)
        with answers.lock:
            answers.seen.add(msg.get("causation_id", ""))
            answers.kinds[msg.get("event_type", "?")] = answers.kinds.get(msg.get("event_type", "?"), 0) + 1
            answers.failed += msg.get("event_type") == "listing.failed"
        channel.basic_ack(method.delivery_tag)

    while not stop.is_set():
        try:
            conn = connect()
            ch = conn.channel()
            ch.basic_qos(prefetch_count=500)
            ch.basic_consume(f"{namespace}.listing-events", on_message)
            while not stop.is_set():
                conn.process_data_events(time_limit=0.5)
            conn.close()
        except broker_errors() as exc:
            answers.reconnects += 1
            log(f"consumer lost the broker ({type(exc).__name__}); reconnecting")
            time.sleep(1.0)


class Publisher:
    """Publishes product events with publisher confirms and survives a broker restart: an event whose confirm
    never came is published again after reconnecting. The copy carries the same event id, so the inbox takes
    it once (a restart during the run is itself a check of intake idempotency)."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.reconnects = 0
        self.republished = 0
        self._open()

    def _open(self) -> None:
        self.conn = connect()
        self.ch = self.conn.channel()
        self.ch.confirm_delivery()

    def publish(self, payload: dict[str, Any]) -> None:
        import pika

        body = json.dumps(payload).encode()
        props = pika.BasicProperties(content_type="application/json", delivery_mode=2,
                                     message_id=payload["event_id"])
        for attempt in range(20):
            try:
                self.ch.basic_publish(exchange=f"{self.namespace}.events", routing_key=payload["event_type"],
                                      body=body, properties=props)
                self.republished += attempt > 0
                return
            except broker_errors() as exc:
                self.reconnects += 1
                log(f"publisher lost the broker ({type(exc).__name__}); reconnecting")
                time.sleep(1.0)
                self._open()
        raise RuntimeError("could not publish after 20 reconnects")

    def idle(self, seconds: float) -> None:
        try:
            self.conn.process_data_events(time_limit=seconds)
        except broker_errors():
            self.reconnects += 1
            self._open()

    def close(self) -> None:
        try:
            self.conn.close()
        except broker_errors():
            pass


def timed(samples: dict[str, list[float]], name: str, fn: Any) -> None:
    started = time.perf_counter()
    fn()
    samples.setdefault(name, []).append((time.perf_counter() - started) * 1000)


def probe_statements(factory: Any, probe_product: int) -> dict[str, list[float]]:
    from db.engine import set_system_scope, set_tenant, system_session, tenant_session
    from db.enums import InboxStatus, JobStatus, Stage
    from db.repositories import coverage, inbox
    from db.repositories import jobs as job_rows
    from db.repositories import outbox as outbox_rows
    from db.tables import EnrichmentJob
    from tasks.pipeline import jobs
    from tasks.pipeline.reconcile import Reason
    from tasks.pipeline.work import EnrichRequest, ImageRef

    out: dict[str, list[float]] = {}
    for _ in range(30):
        def insert() -> None:
            with tenant_session(factory, PROBE) as s:
                inbox.record(s, uuid.uuid4(), tenant_id=PROBE, event_type="product.updated",
                             status=InboxStatus.accepted)
        timed(out, "inbox insert", insert)
    for _ in range(30):
        session = factory()
        try:
            set_tenant(session, PROBE)
            event_id = uuid.uuid4()
            inbox.record(session, event_id, tenant_id=PROBE, event_type="product.updated", status=InboxStatus.accepted)
            job = job_rows.add(session, EnrichmentJob(
                tenant_id=PROBE, event_id=event_id, product_id=probe_product, product_version=1,
                status=JobStatus.pending.value,
                work=EnrichRequest((ImageRef("file:///probe.jpg", "primary"),)).to_work()))
            session.flush()
            timed(out, "stage claim", lambda: jobs.claim(session, job.id, Stage.fetch, "probe"))
        finally:
            session.rollback()  # nothing of the probe job stays
            session.close()
    for _ in range(20):
        session = factory()
        try:
            set_system_scope(session)
            timed(out, "outbox relay lock", lambda: outbox_rows.lock_pending(session, 20))
        finally:
            session.rollback()
            session.close()
    for _ in range(2):
        def scan() -> None:
            with system_session(factory) as s:
                coverage.products_in(s, [r.value for r in Reason], stalled_after=timedelta(minutes=6),
                                     queued_after=timedelta(hours=24), limit=1000)
        timed(out, "reconcile scan", scan)
    return out


def table_sizes(owner: Any) -> tuple[dict[str, int], dict[str, float]]:
    from sqlalchemy import text

    rows, mib = {}, {}
    with owner.connect() as c:
        for t in TABLES:
            rows[t] = int(c.execute(text(f"SELECT count(*) FROM {t}")).scalar_one())
            mib[t] = c.execute(text("SELECT pg_total_relation_size(CAST(:t AS regclass))"), {"t": t}).scalar_one() / 2**20
    return rows, mib


def seed_probe(owner: Any) -> int:
    from sqlalchemy import text

    with owner.begin() as c:
        c.execute(text("INSERT INTO tenants (id) VALUES (:t) ON CONFLICT DO NOTHING"), {"t": PROBE})
        c.execute(text("INSERT INTO merchants (tenant_id, id) VALUES (:t, 'm') ON CONFLICT DO NOTHING"), {"t": PROBE})
        return int(c.execute(text("INSERT INTO products (tenant_id, merchant_id, external_id, version, category) "
                                  "VALUES (:t, 'm', 'probe', 1, 'shirt') RETURNING id"), {"t": PROBE}).scalar_one())


def prune_kwargs(keep_s: int) -> dict[str, Any]:
    return {"outbox_keep_s": 60, "inbox_keep_s": keep_s, "jobs_keep_s": keep_s, "results_keep_s": 60,
            "dead_letters_keep_s": 30 * 86400, "summaries_keep_s": 400 * 86400, "batch_size": 2000, "max_run_s": 20.0}


def print_table(samples: list[Sample]) -> None:
    short = {"inbox_events": "inbox", "enrichment_jobs": "jobs", "outbox": "outbox", "dead_letters": "dead",
             "job_summaries": "summ", "listings": "listings", "photo_embeddings": "photo vec"}
    head = ["answered", "t s"] + list(short.values()) + ["results"] + [f"{s} p50/p95 ms" for s in STATEMENTS]
    print("\n| " + " | ".join(head) + " |")
    print("|" + "|".join(" ---: " for _ in head) + "|")
    for s in samples:
        cells = [f"{s.answered:,}", f"{s.t_s:.0f}"] + [f"{s.rows[t]:,}" for t in short] + [f"{s.result_docs:,}"]
        cells += [f"{s.p50[n]:.2f} / {s.p95[n]:.2f}" for n in STATEMENTS]
        print("| " + " | ".join(cells) + " |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--products", type=int, default=5_000)
    ap.add_argument("--photos", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=32, help="ENRICH_WORKERS__BATCH_SIZE (gpu micro-batch)")
    ap.add_argument("--cpu-concurrency", type=int, default=2, help="prefork processes of the events+cpu worker")
    ap.add_argument("--window", type=int, default=1000, help="most events published but not yet answered "
                    "(below --products, so a product's next version is published after its last one was answered)")
    ap.add_argument("--sample-every", type=int, default=2500)
    ap.add_argument("--prune-every-s", type=float, default=30.0)
    ap.add_argument("--keep-s", type=int, default=300, help="compressed inbox/jobs window of the prune sent here")
    ap.add_argument("--stop-publishing-at", default=None, help="UTC HH:MM: publish no more after this")
    ap.add_argument("--drain-s", type=float, default=300.0, help="longest wait for answers after publishing")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.window >= args.products:
        ap.error("--window must be below --products (otherwise versions of one product overtake each other and "
                 "the superseded ones are never answered)")
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the workers and broker objects on the way out

    from sqlalchemy import text

    from db import migrate
    from db.embedded import start_embedded
    from db.engine import make_engine, make_sessionmaker
    from tasks.events import product_event_payload
    from tests.integration.harness import Deployment, base_env, require_service

    require_service(5672, "RabbitMQ", "start it (infra/scripts/services.sh)")
    work = Path(tempfile.mkdtemp(prefix="sustained-"))
    url = start_embedded(work / "pgdata")
    owner = make_engine(url, pool_size=2, statement_timeout_ms=0)
    migrate.upgrade(owner)
    factory = make_sessionmaker(make_engine(url, pool_size=2, runtime_role="enrich_worker"))
    probe_product = seed_probe(owner)
    namespace = f"s{uuid.uuid4().hex[:8]}"
    (work / "data").mkdir()
    env = base_env(pg_url=url, data_dir=work / "data", namespace=namespace,
                   ENRICH_ENRICHMENT__TENANTS=json.dumps({TENANT: ["dedup", "embeddings"]}),
                   ENRICH_WORKERS__BATCH_SIZE=str(args.batch_size), ENRICH_WORKERS__BATCH_MAX_WAIT_MS="100",
                   ENRICH_WORKERS__CPU_THREADS="1", ENRICH_WORKERS__RECONCILE_INTERVAL_S="300",
                   ENRICH_RETENTION__INTERVAL_S="10", ENRICH_RETENTION__OUTBOX_KEEP_S="60",
                   ENRICH_RETENTION__RESULTS_KEEP_S="60", ENRICH_RETENTION__INBOX_KEEP_S="3600",
                   ENRICH_RETENTION__JOBS_KEEP_S="3600", ENRICH_LOG_LEVEL="WARNING")
    os.environ.update({k: v for k, v in env.items() if k.startswith("ENRICH_")})
    from workers.celery_app import send_task

    dep = Deployment(env=env, data_dir=work / "data", namespace=namespace, engine=owner)
    items = photos(args.photos)
    answers, stop = Answers(), threading.Event()
    samples: list[Sample] = []
    stop_at = None
    if args.stop_publishing_at:
        hh, mm = (int(x) for x in args.stop_publishing_at.split(":"))
        stop_at = datetime.now(UTC).replace(hour=hh, minute=mm, second=0, microsecond=0)
    published = 0
    try:
        dep.start_worker("events,cpu", concurrency=args.cpu_concurrency)
        dep.start_worker("gpu")
        dep.start_beat()
        consumer = threading.Thread(target=consume, args=(namespace, answers, stop), daemon=True)
        consumer.start()
        publisher = Publisher(namespace)
        log(f"sustained: {args.events} events over {args.products} products, {len(items)} photos, "
            f"batch {args.batch_size}, cpu concurrency {args.cpu_concurrency}; data in {work}")
        started = last_prune = time.monotonic()
        next_sample = 0

        def sample() -> None:
            rows, mib = table_sizes(owner)
            probes = probe_statements(factory, probe_product)
            results = work / "data" / "originals" / "results"
            s = Sample(answered=answers.count(), published=published, t_s=time.monotonic() - started, rows=rows,
                       mib=mib, result_docs=sum(1 for _ in results.iterdir()) if results.exists() else 0,
                       p50={k: statistics.median(v) for k, v in probes.items()},
                       p95={k: statistics.quantiles(v, n=20)[18] for k, v in probes.items()})
            samples.append(s)
            if args.out:  # what a run that dies later still leaves behind
                args.out.write_text(json.dumps({"partial": True, "published": published,
                                                "samples": [x.__dict__ for x in samples]}, indent=2, default=str))
            log(f"sample: answered {s.answered} published {s.published} ({s.answered / max(s.t_s, 1e-9):.2f}/s) "
                f"inbox {rows['inbox_events']} jobs {rows['enrichment_jobs']} outbox {rows['outbox']} "
                f"results {s.result_docs} | " + ", ".join(f"{k} {s.p50[k]:.2f}/{s.p95[k]:.2f}" for k in STATEMENTS))

        sample()
        while True:
            done = answers.count()
            if time.monotonic() - last_prune >= args.prune_every_s:
                send_task("catalog.prune", kwargs=prune_kwargs(args.keep_s))
                last_prune = time.monotonic()
            if done >= next_sample + args.sample_every:
                next_sample = done - done % args.sample_every
                sample()
            out_of_time = stop_at is not None and datetime.now(UTC) >= stop_at
            if published < args.events and not out_of_time and published - done < args.window:
                for _ in range(min(100, args.events - published)):
                    path, category = items[published % len(items)]
                    product, version = published % args.products, published // args.products + 1
                    payload = product_event_payload(
                        event_type="product.created" if version == 1 else "product.updated", tenant_id=TENANT,
                        merchant_id="m1", external_id=f"sku-{product}", version=version, category=category,
                        image_urls=[path.as_uri()], title=f"{category} {product} v{version}",
                        description="Photographed on a hanger.", attributes={"brand": "Acme"})
                    publisher.publish(payload)
                    published += 1
                continue
            if (published >= args.events or out_of_time) and done >= published:
                break
            if (published >= args.events or out_of_time) and not hasattr(main, "_drain_from"):
                main._drain_from = time.monotonic()  # type: ignore[attr-defined]
                log(f"publishing stopped at {published} events; draining")
            if hasattr(main, "_drain_from") and time.monotonic() - main._drain_from > args.drain_s:  # type: ignore[attr-defined]
                log("drain timeout")
                break
            publisher.idle(0.2)
        elapsed = time.monotonic() - started
        publisher.close()
        sample()
        with owner.connect() as c:
            statuses = dict(c.execute(text("SELECT status, count(*) FROM enrichment_jobs GROUP BY 1")).all())
            summary = dict(c.execute(text("SELECT status, sum(jobs) FROM job_summaries GROUP BY 1")).all()) \
                if c.execute(text("SELECT to_regclass('job_summaries')")).scalar_one() else {}
        from db.engine import system_session
        from tasks.pipeline.reconcile import coverage_counts

        with system_session(factory) as s:
            cover = coverage_counts(s)
    finally:
        stop.set()
        dep.stop_workers()
        dep.delete_broker_objects()
    result = {"published": published, "answered": answers.count(), "failed_events": answers.failed,
              "answers_by_type": answers.kinds, "broker_reconnects": {"consumer": answers.reconnects,
              "publisher": publisher.reconnects, "republished_events": publisher.republished}, "seconds": round(elapsed, 1),
              "events_per_s": round(answers.count() / elapsed, 2), "jobs_by_status_kept": statuses,
              "job_summaries_by_status": {k: int(v) for k, v in summary.items()}, "coverage": cover,
              "products": args.products, "photos": len(items), "batch_size": args.batch_size,
              "cpu_concurrency": args.cpu_concurrency, "keep_s": args.keep_s, "profile": "tiny",
              "policy": "dedup+embeddings", "random_weights": True,
              "samples": [s.__dict__ for s in samples]}
    print_table(samples)
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2, default=str))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
