"""The CPU-path soak (scenario 8), shared by the slow test (a few hundred events) and
``infra/bench/soak_cpu_path.py`` (10,000): seed one enriched product per photo, then publish many
more products with those same photos, so every further event takes the CPU path only (intake →
fetch + exact-duplicate dedup → persist by reuse; no model batch), while the worker's resident
memory (main process + prefork children) is sampled over time. Then I1–I4 over everything."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text

from tests.reliability.harness import FaultDeployment, WorkerSpec

CPU_WORKER = "events-cpu"


@dataclass
class Sample:
    t_s: float
    finished: int
    rss_mb: float


@dataclass
class SoakResult:
    events: int
    seconds: float
    samples: list[Sample] = field(default_factory=list)
    model_batches_during: int = 0

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    def rss_at(self, fraction: float) -> float:
        """RSS (MB) of the first sample at or after this fraction of the events finished."""
        target = self.events * fraction
        for s in self.samples:
            if s.finished >= target:
                return s.rss_mb
        return self.samples[-1].rss_mb

    @property
    def peak_mb(self) -> float:
        return max(s.rss_mb for s in self.samples)

    def table(self, rows: int = 12) -> str:
        step = max(1, len(self.samples) // rows)
        picked = self.samples[::step] + ([self.samples[-1]] if (len(self.samples) - 1) % step else [])
        lines = [f"{'t (s)':>8} {'finished':>9} {'RSS (MB)':>9}"]
        lines += [f"{s.t_s:8.1f} {s.finished:9d} {s.rss_mb:9.1f}" for s in picked]
        return "\n".join(lines)


def start_soak_workers(dep: FaultDeployment) -> None:
    dep.start(WorkerSpec(CPU_WORKER, "events,cpu", {"ENRICH_FAULTS__TRACE": "true"}),
              WorkerSpec("gpu", "gpu", {"ENRICH_FAULTS__TRACE": "true"}))


def _finished(dep: FaultDeployment, tenants: list[str]) -> int:
    with dep.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM enrichment_jobs WHERE tenant_id = ANY(:t) "
                                     "AND status IN ('done', 'failed')"), {"t": tenants}).scalar() or 0)


def run_soak(dep: FaultDeployment, make_event: Callable[..., dict[str, Any]], *, events: int, photos: int,
             tenants: list[str], chunk: int = 500, sample_every_s: float = 2.0, timeout: float = 3600,
             progress: Callable[[Sample], None] | None = None) -> SoakResult:
    """Seed ``photos`` products per tenant (model work), then ``events`` CPU-path events spread
    over the tenants, published in chunks; returns RSS samples of the CPU worker."""
    # Re-listings of the seeded photos with the seeds' own text: true re-listings, copied without model work.
    seeds = [make_event(t, f"seed-{n}", n, title=f"Listing of photo {n}") for t in tenants for n in range(photos)]
    dep.wait_finished(dep.publish_many(seeds), timeout=300)
    batches_before = dep.count(r"point=model\.batch")
    payloads = [make_event(tenants[i % len(tenants)], f"soak-{i}", i % photos, title=f"Listing of photo {i % photos}")
                for i in range(events)]
    base = _finished(dep, tenants)
    result = SoakResult(events=events, seconds=0.0)
    stop = threading.Event()
    started = time.monotonic()

    def sampler() -> None:
        while not stop.is_set():
            s = Sample(round(time.monotonic() - started, 1), _finished(dep, tenants) - base,
                       dep.rss_bytes(CPU_WORKER) / 2**20)
            result.samples.append(s)
            if progress:
                progress(s)
            stop.wait(sample_every_s)

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    ids = []
    try:
        for i in range(0, len(payloads), chunk):  # keep the queue a few chunks deep, as a backend would
            while i - (_finished(dep, tenants) - base) > 2 * chunk:
                dep.supervise()
                time.sleep(0.5)
            ids += dep.publish_many(payloads[i:i + chunk])
        dep.wait_finished(ids, timeout=timeout)
    finally:
        stop.set()
        thread.join(10)
    result.seconds = time.monotonic() - started
    result.samples.append(Sample(round(result.seconds, 1), _finished(dep, tenants) - base,
                                 dep.rss_bytes(CPU_WORKER) / 2**20))
    result.model_batches_during = dep.count(r"point=model\.batch") - batches_before
    return result
