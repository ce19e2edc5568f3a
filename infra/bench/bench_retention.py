"""Retention benchmark (not a test): a year of bookkeeping at the target rate, scaled down, then the
hot statements and the retention passes measured before and after retention, then a steady state.

Target: 1,000,000 product events a day and a 100M-product catalog. ``--scale N`` divides both
(default 500: 2,000 events a day, 200,000 products, 730,000 events in a year, i.e. 730k inbox rows,
730k jobs and 2.92M outbox rows: four per event, the three stage hand-offs and listing.enriched).

1. A throwaway embedded PostgreSQL migrated to 0009 (the schema before retention), loaded with a
   year of history set-based (timestamps spread over the 365 days before now).
2. Hot statements, each through the real repository/pipeline function, as ``enrich_worker`` under
   forced row-level security: inbox insert (``inbox.record`` in a tenant transaction), stage claim
   (``tasks.pipeline.jobs.claim`` of a pending job, in ``job_session``), outbox relay
   (``tasks.pipeline.outbox.relay`` of 20 fresh rows, to a publisher that drops what it is given),
   reconcile scan (``coverage.products_in``, limit 1000, at the production statement timeout).
3. The same after ``alembic upgrade 0010`` (its indexes), then a retention catch-up (the real
   ``run_retention`` as beat runs it, repeated until nothing is due), VACUUM ANALYZE (what
   autovacuum does after it), and the statements once more.
4. Steady state: ``steady --events`` (default 25,000 a run, each run carrying on where the last stopped,
   so two runs make the 50,000; one run stays under 10 minutes on this 2-core box) events at the
   repository level: per event the
   real intake (``accept_product_event``: inbox, version guard, product, job, outbox hand-off), then
   one transaction with the three stage claims and hand-offs (``jobs.claim``/``hand_off``/
   ``finish``), a result document written to a local blob store and ``listing.enriched`` added to
   the outbox; after every ``--prune-every`` events the relay of what they wrote and one retention
   run. ``--drivers`` threads drive the events (each its own slice of the products). Simulated time
   is compressed: a day is the time the last day's worth of events at the scaled rate took (measured
   as it goes), and the outbox, inbox, job and result-document windows are the default ones in that
   unit. Table sizes and statement latencies are sampled along the way.

The throwaway database runs with ``synchronous_commit = off``: every figure here is about how a
statement's cost moves with the size of the tables, and the WAL flush of a commit on this shared
disk (a constant 1-4 ms that other processes' writes make jittery) would only blur that. Production
keeps the default (on) and pays that flush once per transaction on top of these figures.

    .venv/bin/python infra/bench/bench_retention.py history          # steps 1-3, scale 500 (about 5 min here)
    .venv/bin/python infra/bench/bench_retention.py steady           # step 4 on that database: 25,000 events
    .venv/bin/python infra/bench/bench_retention.py steady           # ... and 25,000 more (50,000 in all)
    .venv/bin/python infra/bench/bench_retention.py history --scale 20000 && \
        .venv/bin/python infra/bench/bench_retention.py steady --events 2000 --sample-every 500   # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from sqlalchemy import Engine, text  # noqa: E402
from sqlalchemy.exc import OperationalError  # noqa: E402

from db import migrate  # noqa: E402
from db.embedded import start_embedded  # noqa: E402
from db.engine import job_session, make_engine, make_sessionmaker, system_session, tenant_session  # noqa: E402
from db.enums import InboxStatus, Stage  # noqa: E402
from db.repositories import coverage, inbox  # noqa: E402
from db.repositories import jobs as job_rows  # noqa: E402
from db.repositories import outbox as outbox_rows  # noqa: E402
from tasks.events import parse_product_event, product_event_payload  # noqa: E402
from tasks.io.blobs import LocalBlobStore, result_key  # noqa: E402
from tasks.maintenance.retention import RetentionPolicy, RetentionReport, run_retention  # noqa: E402
from tasks.pipeline import jobs  # noqa: E402
from tasks.pipeline.intake import accept_product_event  # noqa: E402
from tasks.pipeline.outbox import enqueue_task, relay  # noqa: E402
from tasks.pipeline.reconcile import Reason  # noqa: E402
from tasks.pipeline.work import EnrichRequest, FetchedImages, ImageRef, ModelOutput  # noqa: E402

EVENTS_PER_DAY, PRODUCTS, TENANTS = 1_000_000, 100_000_000, 20
BOOKKEEPING = ("inbox_events", "enrichment_jobs", "outbox", "dead_letters", "job_summaries", "job_stage_timings",
               "inbox_summaries")
WORKER = "enrich_worker"


class DroppingPublisher:
    """The relay's publisher with the broker taken out: the database side of the relay is what is measured."""

    def __init__(self) -> None:
        self.published = 0

    def publish(self, routing_key: str, payload: dict[str, Any], *, message_id: str) -> None:
        self.published += 1


@dataclass
class Timings:
    samples: dict[str, list[float]] = field(default_factory=dict)

    def time(self, name: str, fn: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        out = fn()
        self.samples.setdefault(name, []).append((time.perf_counter() - started) * 1000)
        return out

    def summary(self, name: str) -> str:
        values = self.samples.get(name) or []
        if not values:
            return "—"
        if len(values) < 5:
            return f"{statistics.median(values):.1f}"
        q = statistics.quantiles(values, n=20)
        return f"{statistics.median(values):.2f} / {q[18]:.2f}"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------- a year of history, set-based

def load_year(owner: Engine, *, events: int, products: int, days: int = 365) -> None:
    step_ms = days * 86_400_000 / events
    with owner.begin() as c:
        c.execute(text("INSERT INTO tenants (id) SELECT 'bench-' || t FROM generate_series(0, :n - 1) t"),
                  {"n": TENANTS})
        c.execute(text("INSERT INTO merchants (tenant_id, id) SELECT 'bench-' || t, 'm' FROM generate_series(0, :n - 1) t"),
                  {"n": TENANTS})
        c.execute(text("INSERT INTO products (tenant_id, merchant_id, external_id, version, category, title) "
                       "SELECT 'bench-' || (i % :t), 'm', 'sku-' || i, 0, 'dress', 'Product ' || i "
                       "FROM generate_series(0, :p - 1) i"), {"t": TENANTS, "p": products})
        c.execute(text("""
            CREATE UNLOGGED TABLE bench_events AS
            SELECT n, p.id AS product_id, p.tenant_id, x.at,
                   row_number() OVER (PARTITION BY p.id ORDER BY n) AS version,
                   CAST(md5('event' || n) AS uuid) AS event_id
            FROM (SELECT n, (n * 7919) % :p AS slot,
                         now() - make_interval(days => :days) + make_interval(secs => n * :step / 1000.0) AS at
                  FROM generate_series(CAST(0 AS bigint), :e - 1) n) x
            JOIN products p ON p.external_id = 'sku-' || x.slot"""),
                  {"p": products, "e": events, "days": days, "step": step_ms})
    log("load: events laid out")
    with owner.begin() as c:
        c.execute(text("""
            INSERT INTO inbox_events (event_id, tenant_id, event_type, status, received_at)
            SELECT event_id, tenant_id, CASE WHEN version = 1 THEN 'product.created' ELSE 'product.updated' END,
                   'accepted', at FROM bench_events ORDER BY n"""))
        c.execute(text("""
            INSERT INTO enrichment_jobs (tenant_id, event_id, product_id, product_version, status, stage, error_code,
                                         retryable, attempts, timings_ms, work, created_at, updated_at, finished_at)
            SELECT tenant_id, event_id, product_id, version,
                   CASE WHEN n % 100 < 97 THEN 'done' WHEN n % 100 < 99 THEN 'failed' ELSE 'superseded' END,
                   'persist',
                   CASE WHEN n % 100 BETWEEN 97 AND 98
                        THEN (ARRAY['fetch_timeout', 'image_rejected', 'url_not_allowed'])[n % 3 + 1] END,
                   CASE WHEN n % 100 BETWEEN 97 AND 98 THEN false END,
                   '{"fetch": 1, "model": 1, "persist": 1}',
                   jsonb_build_object('fetch', 200 + n % 400, 'ground', 40 + n % 30, 'describe', 900 + n % 700,
                                      'verify', 60 + n % 40, 'embed', 15 + n % 10, 'persist', 20 + n % 25),
                   jsonb_build_object(
                       'image_urls', jsonb_build_array(jsonb_build_array(
                           'https://cdn.example.com/p/' || product_id || '/v' || version || '.jpg', 'primary')),
                       'image_ids', jsonb_build_array(n), 'primary_image_id', n,
                       'primary_uri', 's3://catalog-originals/v1/originals/' || tenant_id || '/' || md5('i' || n),
                       'duplicates', '[]'::jsonb, 'reuse_listing_id', NULL, 'reuse_key', NULL,
                       'claims', jsonb_build_object('fetch', md5('f' || n), 'model', md5('m' || n),
                                                    'persist', md5('p' || n)),
                       'result_uri', 's3://catalog-originals/v1/results/' || n),
                   at, at + interval '6 seconds', at + interval '6 seconds'
            FROM bench_events ORDER BY n"""))
    log("load: inbox and jobs")
    with owner.begin() as c:
        c.execute(text("""
            INSERT INTO outbox (tenant_id, message_id, routing_key, payload, created_at, published_at, publish_attempts)
            SELECT e.tenant_id, CAST(md5('out' || e.n || '-' || k) AS uuid),
                   (ARRAY['task:catalog.fetch', 'task:catalog.model', 'task:catalog.persist', 'listing.enriched'])[k + 1],
                   CASE WHEN k < 3 THEN jsonb_build_object(
                            'task', (ARRAY['catalog.fetch', 'catalog.model', 'catalog.persist'])[k + 1],
                            'args', jsonb_build_array(e.n), 'queue', CASE WHEN k = 1 THEN 'gpu' ELSE 'cpu' END)
                   ELSE jsonb_build_object(
                       'schema_version', 2, 'event_id', CAST(md5('ev' || e.n) AS uuid), 'event_type', 'listing.enriched',
                       'causation_id', e.event_id, 'occurred_at', e.at, 'tenant_id', e.tenant_id, 'merchant_id', 'm',
                       'product', jsonb_build_object('external_id', 'sku-' || e.product_id, 'version', e.version),
                       'listing', jsonb_build_object(
                           'listing_id', e.n, 'category', 'dress', 'schema_id', 'dress@1',
                           'title', 'Floral midi dress with short sleeves and a round neckline',
                           'description', repeat('A light summer dress with a floral print. ', 7),
                           'attributes', jsonb_build_object(
                               'color', jsonb_build_object('value', 'red', 'confidence', 0.81, 'source', 'image'),
                               'pattern', jsonb_build_object('value', 'floral', 'confidence', 0.77, 'source', 'image'),
                               'material', jsonb_build_object('value', 'cotton', 'source', 'merchant')),
                           'status', 'proposed', 'forced_fields', '[]'::jsonb, 'forced_tokens', 0,
                           'conflicts', '[]'::jsonb, 'text_checks', '{"retried": false, "repaired": []}'::jsonb),
                       'grounding', jsonb_build_object('box', '[12.0, 30.5, 410.0, 590.0]'::jsonb, 'score', 0.61,
                                                       'fallback', false),
                       'duplicates', '[]'::jsonb,
                       'models', jsonb_build_object('detector', 'owlv2@hub-1', 'vlm', 'smolvlm@hub-2',
                                                    'clip', 'ViT-B-32@tag-3', 'random_weights', false))
                   END,
                   e.at + k * interval '2 seconds', e.at + k * interval '2 seconds' + interval '50 milliseconds', 1
            FROM bench_events e CROSS JOIN generate_series(0, 3) k ORDER BY e.n, k"""))
    log("load: outbox")
    with owner.begin() as c:
        c.execute(text("UPDATE products p SET version = m.v, updated_at = m.at FROM "
                       "(SELECT product_id, max(version) AS v, max(at) AS at FROM bench_events GROUP BY 1) m "
                       "WHERE p.id = m.product_id"))
        c.execute(text("""
            INSERT INTO dead_letters (tenant_id, queue, routing_key, reason, detail, body, created_at)
            SELECT tenant_id, 'catalog.product-events', 'product.updated', 'delivery_limit', 'worker died',
                   convert_to('{"event_id": "' || event_id || '"}', 'UTF8'), at
            FROM bench_events WHERE n % 10000 = 0"""))
        c.execute(text("DROP TABLE bench_events"))
    vacuum(owner)


def _present(c: Any, tables: tuple[str, ...]) -> list[str]:
    """The tables of ``tables`` this schema has (the summary tables arrive with 0010)."""
    return [t for t in tables if c.execute(text("SELECT to_regclass(:t)"), {"t": t}).scalar_one() is not None]


def vacuum(owner: Engine) -> float:
    started = time.perf_counter()
    with owner.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        for table in _present(c, (*BOOKKEEPING, "products")):
            c.execute(text(f"VACUUM (ANALYZE) {table}"))
    return time.perf_counter() - started


def sizes(owner: Engine) -> dict[str, tuple[int, float]]:
    """Rows and total MiB (heap + indexes + TOAST) of each bookkeeping table."""
    out = dict.fromkeys(BOOKKEEPING, (0, 0.0))
    with owner.connect() as c:
        for table in _present(c, BOOKKEEPING):
            rows = c.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
            mib = c.execute(text("SELECT pg_total_relation_size(CAST(:t AS regclass))"), {"t": table}).scalar_one()
            out[table] = (int(rows), mib / 2**20)
    return out


# ---------------------------------------------------------------- the hot statements

def _pending_jobs(factory: Any, owner: Engine, n: int, tenant: str = "bench-0") -> list[int]:
    """``n`` pending jobs (new product versions of ``tenant``), created by the real intake functions."""
    with owner.begin() as c:
        rows = c.execute(text("UPDATE products SET version = version + 1 WHERE id IN (SELECT id FROM products "
                              "WHERE tenant_id = :t ORDER BY random() LIMIT :n) RETURNING id, version"),
                         {"t": tenant, "n": n}).all()
    out = []
    for pid, version in rows:
        with tenant_session(factory, tenant) as s:
            event_id = uuid.uuid4()
            inbox.record(s, event_id, tenant_id=tenant, event_type="product.updated", status=InboxStatus.accepted)
            job = jobs.create(s, tenant_id=tenant, event_id=event_id, product_id=pid, product_version=version,
                              request=EnrichRequest((ImageRef("https://cdn.example.com/x.jpg", "primary"),)))
            out.append(job.id)
    return out


def measure(factory: Any, owner: Engine, *, inserts: int = 400, claims: int = 200, relays: int = 30,
            scans: int = 3) -> Timings:
    t = Timings()
    tenant = "bench-0"
    for _ in range(inserts):
        def insert() -> None:
            with tenant_session(factory, tenant) as s:
                inbox.record(s, uuid.uuid4(), tenant_id=tenant, event_type="product.updated",
                             status=InboxStatus.accepted)
        t.time("inbox insert", insert)
    for job_id in _pending_jobs(factory, owner, claims):
        def claim(job_id: int = job_id) -> None:
            with job_session(factory, job_id) as s:
                assert jobs.claim(s, job_id, Stage.fetch, f"bench-{job_id}") is not None
        t.time("stage claim", claim)
    publisher = DroppingPublisher()
    relay(factory, publisher, limit=10_000)  # what the claims' jobs dispatched
    for _ in range(relays):
        with system_session(factory) as s:
            for _ in range(20):
                enqueue_task(s, "catalog.fetch", 0, queue="cpu", tenant_id=tenant)
        t.time("outbox relay (20 rows)", lambda: relay(factory, publisher))
    for _ in range(scans):
        def scan() -> None:
            with system_session(factory) as s:
                coverage.products_in(s, [r.value for r in Reason], stalled_after=timedelta(minutes=6),
                                     queued_after=timedelta(hours=24), limit=1000)
        try:
            t.time("reconcile scan", scan)
        except OperationalError as exc:
            if "statement timeout" not in str(exc):
                raise
            t.samples.setdefault("reconcile scan", []).append(float("inf"))
            break
    return t


# ---------------------------------------------------------------- retention catch-up

@dataclass
class CatchUp:
    runs: list[RetentionReport] = field(default_factory=list)
    batch_ms: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0

    def deleted(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for r in self.runs:
            for k, v in r.deleted.items():
                total[k] = total.get(k, 0) + v
        return total


def catch_up(factory: Any, blobs: LocalBlobStore, policy: RetentionPolicy, *, now: Any = None) -> CatchUp:
    out = CatchUp()
    last = [time.perf_counter()]

    def on_batch(report: RetentionReport) -> None:
        now_t = time.perf_counter()
        out.batch_ms.append((now_t - last[0]) * 1000)
        last[0] = now_t
        if report.batches % 200 == 0:
            log(f"  retention: {report.batches} batches in this run, "
                + ", ".join(f"{k}={v}" for k, v in report.deleted.items() if v))

    started = time.perf_counter()
    while True:
        last[0] = time.perf_counter()
        report = run_retention(factory, blobs, policy, now=now, on_batch=on_batch)
        out.runs.append(report)
        if report.caught_up or report.busy:
            break
    out.elapsed_s = time.perf_counter() - started
    return out


# ---------------------------------------------------------------- steady state

@dataclass
class SteadySample:
    events: int
    sim_days: float
    rows: dict[str, int]
    mib: float
    intake: str
    stages: str
    relay: str
    scan: str
    prune: str
    blobs: int
    pruned_per_run: float


def _event(tenant: str, external_id: str, version: int) -> Any:
    payload = product_event_payload(
        event_type="product.updated", tenant_id=tenant, merchant_id="m", external_id=external_id,
        version=version, category="dress", image_urls=[f"https://cdn.example.com/p/{external_id}/v{version}.jpg"],
        title="Floral midi dress", description="A light summer dress with a floral print.")
    return parse_product_event(json.dumps(payload).encode(), "application/json", "product.updated")


def _stages(factory: Any, blobs: LocalBlobStore, job_id: int, listing_id: int) -> None:
    """fetch → model → persist of one job: the claims, hand-offs and finish, one transaction."""
    task = f"steady-{job_id}"
    with job_session(factory, job_id) as s:
        job = jobs.claim(s, job_id, Stage.fetch, task)
        assert job is not None
        jobs.hand_off(s, job, Stage.model, FetchedImages((job_id,), job_id, f"file:///originals/{job_id}"),
                      timings={"fetch": 250.0})
        job = jobs.claim(s, job_id, Stage.model, task)
        assert job is not None
        uri = blobs.put(result_key(job_id), b'{"listing": "result document"}' + b" " * 2000)
        jobs.hand_off(s, job, Stage.persist, ModelOutput(uri), timings={"ground": 40.0, "describe": 900.0})
        job = jobs.claim(s, job_id, Stage.persist, task)
        assert job is not None
        jobs.finish(s, job, listing_id=listing_id, timings={"persist": 20.0})
        outbox_rows.add(s, tenant_id=job.tenant_id, message_id=uuid.uuid4(), routing_key="listing.enriched",
                        payload={"event_type": "listing.enriched", "causation_id": str(job.event_id),
                                 "listing": {"title": "Floral midi dress", "description": "x" * 300}})


def _one_listing(owner: Engine) -> int:
    """One listing row every steady-state job points at (``finish`` needs an existing listing id);
    the one an earlier steady run made, if any."""
    with owner.begin() as c:
        found = c.execute(text("SELECT l.id FROM listings l JOIN model_versions mv ON mv.id = l.model_version_id "
                               "WHERE mv.name = 'bench' LIMIT 1")).scalar_one_or_none()
        if found is not None:
            return int(found)
        pid = c.execute(text("SELECT id FROM products WHERE tenant_id = 'bench-0' ORDER BY id LIMIT 1")).scalar_one()
        mv = c.execute(text("INSERT INTO model_versions (kind, name, revision, profile, random_weights, status) "
                            "VALUES ('vlm', 'bench', 'r', 'tiny', true, 'candidate') RETURNING id")).scalar_one()
        image = c.execute(text("INSERT INTO images (tenant_id, sha256, phash, dhash, width, height, byte_size, "
                               "format, storage_uri) VALUES ('bench-0', repeat('a', 64), CAST(repeat('0', 64) AS bit(64)), "
                               "CAST(repeat('0', 64) AS bit(64)), 1, 1, 1, 'JPEG', 'x') RETURNING id")).scalar_one()
        return c.execute(text("INSERT INTO listings (tenant_id, product_id, product_version, model_version_id, "
                              "image_id, category, schema_id, content, model_output, model_input, model_versions, "
                              "random_weights) VALUES ('bench-0', :p, 0, :mv, :img, 'dress', 'dress@1', '{}', '{}', "
                              "'{}', '{}', true) RETURNING id"), {"p": pid, "mv": mv, "img": image}).scalar_one()


def _drive(factory: Any, blobs: LocalBlobStore, t: Timings, listing_id: int, keys: list[tuple[str, str]],
           versions: dict[tuple[str, str], int], first: int, count: int) -> None:
    """``count`` events for products of ``keys`` (this driver's own slice: no two drivers race on a product)."""
    for i in range(first, first + count):
        key = keys[(i * 104_729) % len(keys)]
        versions[key] += 1

        def intake(key: tuple[str, str] = key) -> int:
            with tenant_session(factory, key[0]) as s:
                return accept_product_event(s, _event(key[0], key[1], versions[key])).job_id
        job_id = t.time("intake", intake)
        t.time("stages", lambda job_id=job_id: _stages(factory, blobs, job_id, listing_id))


def steady_state(factory: Any, owner: Engine, blobs: LocalBlobStore, *, events: int, per_day: float,
                 prune_every: int, sample_every: int, drivers: int, offset: int = 0,
                 on_sample: Callable[[SteadySample], None] | None = None) -> list[SteadySample]:
    """Rounds of ``prune_every`` events (``drivers`` threads), each round followed by the relay of what
    it wrote and one retention run; a sample of sizes and latencies every ``sample_every`` events.
    ``offset``: events earlier runs drove (the simulated clock and the product sequence go on)."""
    from concurrent.futures import ThreadPoolExecutor

    listing_id = _one_listing(owner)
    with owner.connect() as c:
        catalog = c.execute(text("SELECT tenant_id, external_id, version FROM products ORDER BY id")).all()
    versions = {(r.tenant_id, r.external_id): r.version for r in catalog}
    slices = [[(r.tenant_id, r.external_id) for r in catalog[d::drivers]] for d in range(drivers)]
    publisher = DroppingPublisher()
    t = Timings()
    samples: list[SteadySample] = []
    started = time.perf_counter()
    done = 0
    rounds: deque[tuple[int, float]] = deque(maxlen=max(2, int(per_day // prune_every) + 1))
    with ThreadPoolExecutor(drivers) as pool:
        while done < events:
            share = min(prune_every, events - done) // drivers
            if share == 0:
                break
            futures = [pool.submit(_drive, factory, blobs, t, listing_id, slices[d], versions,
                                   (offset + done) // drivers, share) for d in range(drivers)]
            for f in futures:
                f.result()
            done += share * drivers
            while t.time("relay", lambda: relay(factory, publisher, limit=500)) == 500:
                pass
            rounds.append((done, time.perf_counter()))
            first_done, first_t = rounds[0]
            recent = (done - first_done) / (rounds[-1][1] - first_t) if done > first_done else done / (
                rounds[-1][1] - started)
            day_s = per_day / recent  # real seconds the last simulated day's events took
            report = t.time("prune", lambda day_s=day_s: run_retention(factory, blobs, _compressed(day_s)))
            t.samples.setdefault("pruned rows", []).append(float(sum(report.deleted.values())))
            if (offset + done) % sample_every < share * drivers or done >= events:
                samples.append(_sample(factory, owner, blobs, t, offset + done, per_day))
                if on_sample is not None:
                    on_sample(samples[-1])
                t = Timings()
    return samples


def _sample(factory: Any, owner: Engine, blobs: LocalBlobStore, t: Timings, done: int,
            per_day: float) -> SteadySample:
    def scan() -> None:
        with system_session(factory) as s:
            coverage.products_in(s, [r.value for r in Reason], stalled_after=timedelta(minutes=6),
                                 queued_after=timedelta(hours=24), limit=1000)
    t.time("scan", scan)
    table = sizes(owner)
    results = blobs.root / "results"
    sample = SteadySample(
        events=done, sim_days=done / per_day, rows={k: v[0] for k, v in table.items()},
        mib=sum(v[1] for v in table.values()), intake=t.summary("intake"), stages=t.summary("stages"),
        relay=t.summary("relay"), scan=t.summary("scan"), prune=t.summary("prune"),
        blobs=sum(1 for _ in results.iterdir()) if results.exists() else 0,
        pruned_per_run=statistics.mean(t.samples.get("pruned rows") or [0.0]))
    log(f"steady: {done} events, {sample.sim_days:.1f} simulated days, jobs={sample.rows['enrichment_jobs']} "
        f"outbox={sample.rows['outbox']} intake p50/p95 {sample.intake} ms, stages {sample.stages} ms")
    return sample


def _compressed(day_s: float) -> RetentionPolicy:
    """The default retention windows, with a day lasting ``day_s`` real seconds (summaries and dead
    letters keep real time: summaries are by real hour, and nothing in the run resolves a dead letter)."""
    day = timedelta(seconds=day_s)
    return RetentionPolicy(outbox_keep=day, inbox_keep=7 * day, jobs_keep=7 * day, results_keep=day / 24,
                           dead_letters_keep=timedelta(days=30), summaries_keep=timedelta(days=400),
                           batch_size=1000, max_run_s=60.0)


# ---------------------------------------------------------------- report

def print_measurements(rows: list[tuple[str, dict[str, tuple[int, float]], Timings]]) -> None:
    names = ["inbox insert", "stage claim", "outbox relay (20 rows)", "reconcile scan"]
    print("\n| state | inbox rows | job rows | outbox rows | " + " | ".join(f"{n} p50 / p95 ms" for n in names) + " |")
    print("| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in names) + " |")
    for label, table, timings in rows:
        cells = []
        for n in names:
            values = timings.samples.get(n, [])
            cells.append("> 30 s (statement timeout)" if values and values[-1] == float("inf") else timings.summary(n))
        print(f"| {label} | {table['inbox_events'][0]:,} | {table['enrichment_jobs'][0]:,} | "
              f"{table['outbox'][0]:,} | " + " | ".join(cells) + " |")


def print_catch_up(c: CatchUp, before: dict[str, tuple[int, float]], after: dict[str, tuple[int, float]],
                   vacuum_s: float) -> None:
    deleted = c.deleted()
    rows = sum(deleted.values())
    q = statistics.quantiles(c.batch_ms, n=20) if len(c.batch_ms) >= 20 else [0.0] * 19
    print(f"\nretention catch-up: {len(c.runs)} runs, {sum(r.batches for r in c.runs)} batches, {c.elapsed_s:.1f} s, "
          f"{rows:,} rows and documents removed ({rows / c.elapsed_s:,.0f}/s); batch p50 "
          f"{statistics.median(c.batch_ms):.1f} ms, p95 {q[18]:.1f} ms, max {max(c.batch_ms):.1f} ms; "
          f"then VACUUM ANALYZE {vacuum_s:.1f} s")
    print("| table | rows before | removed | rows after | MiB before | MiB after |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    removed = {"inbox_events": deleted["inbox"], "enrichment_jobs": deleted["jobs"], "outbox": deleted["outbox"],
               "dead_letters": deleted["dead_letters"]}
    for table in ("inbox_events", "enrichment_jobs", "outbox", "dead_letters", "job_summaries", "job_stage_timings"):
        gone = f"{removed[table]:,}" if table in removed else "—"
        print(f"| {table} | {before[table][0]:,} | {gone} | {after[table][0]:,} | "
              f"{before[table][1]:,.1f} | {after[table][1]:,.1f} |")
    print(f"(result documents: {deleted['result_documents']:,} keys deleted, none of them stored: the loaded year "
          "had no files)")


def print_steady(samples: list[SteadySample]) -> None:
    print("\n| events | simulated days | inbox rows | job rows | outbox rows | result docs | bookkeeping MiB | "
          "intake tx p50 / p95 ms | stage tx p50 / p95 ms | relay (500 rows) p50 ms | reconcile scan ms | "
          "retention run p50 ms | rows removed per run |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for s in samples:
        print(f"| {s.events:,} | {s.sim_days:.1f} | {s.rows['inbox_events']:,} | {s.rows['enrichment_jobs']:,} | "
              f"{s.rows['outbox']:,} | {s.blobs:,} | {s.mib:,.1f} | {s.intake} | {s.stages} | "
              f"{s.relay.split(' /')[0]} | {s.scan} | {s.prune.split(' /')[0]} | {s.pruned_per_run:,.0f} |")


def history(args: argparse.Namespace, work: Path) -> None:
    """Steps 1-3: a year loaded, the hot statements before and after, the retention catch-up."""
    import shutil

    per_day, products = EVENTS_PER_DAY / args.scale, PRODUCTS // args.scale
    events = int(per_day * args.days)
    shutil.rmtree(work, ignore_errors=True)
    log(f"scale 1/{args.scale}: {per_day:,.0f} events/day, {products:,} products, {events:,} events over "
        f"{args.days} days; database under {work}")
    owner, worker = _engines(work)
    factory = make_sessionmaker(worker)
    blobs = LocalBlobStore(work / "originals")
    migrate.upgrade(owner, "0009")
    started = time.perf_counter()
    load_year(owner, events=events, products=products, days=args.days)
    log(f"loaded a year in {time.perf_counter() - started:.0f} s")
    measured = [("0009 schema, a year, no retention", sizes(owner), measure(factory, owner))]
    log("measured 0009")
    started = time.perf_counter()
    migrate.upgrade(owner, "0010")
    migration_s = time.perf_counter() - started
    measured.append(("0010 indexes, a year, no retention", sizes(owner), measure(factory, owner)))
    log(f"migrated to 0010 in {migration_s:.1f} s and measured")
    at_year = sizes(owner)
    catch = catch_up(factory, blobs, RetentionPolicy(batch_size=1000, max_run_s=60.0))
    vacuum_s = vacuum(owner)
    after = sizes(owner)
    measured.append(("0010, after retention (7-day window)", after, measure(factory, owner)))
    idle = catch_up(factory, blobs, RetentionPolicy(batch_size=1000, max_run_s=60.0))
    print(f"\nscale 1/{args.scale} of {EVENTS_PER_DAY:,} events/day and {PRODUCTS:,} products; "
          f"migration 0009 → 0010 on a year of rows: {migration_s:.1f} s")
    print_measurements(measured)
    print_catch_up(catch, at_year, after, vacuum_s)
    print(f"a run with nothing due: {idle.elapsed_s * 1000:.0f} ms ({sum(r.batches for r in idle.runs)} batches)")
    (work / "scale").write_text(str(args.scale))
    owner.dispose()
    worker.dispose()


def steady(args: argparse.Namespace, work: Path) -> None:
    """Step 4, on the database ``history`` left behind (after its retention catch-up)."""
    if not (work / "scale").exists():
        raise SystemExit(f"no loaded database under {work}: run the history phase first")
    scale = int((work / "scale").read_text())
    per_day = EVENTS_PER_DAY / scale
    owner, worker = _engines(work)
    progress = work / "steady-samples.jsonl"
    earlier = [SteadySample(**json.loads(line)) for line in progress.read_text().splitlines()] \
        if progress.exists() else []
    offset = earlier[-1].events if earlier else 0
    log(f"steady state: {args.events:,} events after {offset:,} at scale 1/{scale} ({per_day:,.0f} events per "
        f"simulated day), {args.drivers} drivers, a retention run every {args.prune_every} events")

    def keep(sample: SteadySample) -> None:
        with progress.open("a") as fh:
            fh.write(json.dumps(sample.__dict__) + "\n")

    started = time.perf_counter()
    samples = steady_state(make_sessionmaker(worker), owner, LocalBlobStore(args.blobs or work / "results-store"),
                           events=args.events, per_day=per_day, prune_every=args.prune_every,
                           sample_every=args.sample_every, drivers=args.drivers, offset=offset, on_sample=keep)
    elapsed = time.perf_counter() - started
    print(f"\nsteady state: {args.events:,} events in {elapsed:.0f} s ({args.events / elapsed:.0f} events/s); "
          f"{offset + args.events:,} in all")
    print_steady(earlier + samples)
    owner.dispose()
    worker.dispose()


def _engines(work: Path) -> tuple[Engine, Engine]:
    """The owner's engine (loading, DDL, sizes) and the workers' (``SET ROLE enrich_worker``), on a
    database set to ``synchronous_commit = off`` (see the module docstring)."""
    url = start_embedded(work / "pgdata")
    setup = make_engine(url, pool_size=1, statement_timeout_ms=0)
    with setup.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(text("ALTER DATABASE enrich SET synchronous_commit = off"))
    setup.dispose()
    return (make_engine(url, pool_size=2, statement_timeout_ms=0),
            make_engine(url, pool_size=4, statement_timeout_ms=30_000, runtime_role=WORKER))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "bench-retention",
                    help="where the throwaway database lives (history wipes it first)")
    phases = ap.add_subparsers(dest="phase", required=True)
    h = phases.add_parser("history", help="steps 1-3: a year of rows, statements before/after, retention catch-up")
    h.add_argument("--scale", type=int, default=500, help="divide 1M events/day and 100M products by this")
    h.add_argument("--days", type=int, default=365, help="days of history to load")
    st = phases.add_parser("steady", help="step 4: events through the repository functions with retention active")
    st.add_argument("--events", type=int, default=25_000, help="events this run (each run carries on the last)")
    st.add_argument("--prune-every", type=int, default=500, help="a relay and a retention run every N events")
    st.add_argument("--sample-every", type=int, default=5_000)
    st.add_argument("--drivers", type=int, default=2, help="threads driving events")
    st.add_argument("--blobs", type=Path, default=None, help="result-document store (default: in workdir)")
    args = ap.parse_args()
    from workers.logs import configure_logging

    configure_logging(level="WARNING", force=True)  # the pipeline's info lines would drown the report
    (history if args.phase == "history" else steady)(args, args.workdir)


if __name__ == "__main__":
    main()
