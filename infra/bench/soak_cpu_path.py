"""Scenario 8 at full size: N events (default 10,000) through the CPU path with the tiny profile,
on real RabbitMQ, real worker processes and a fresh embedded Postgres; prints the CPU worker's
resident memory over time and checks I1–I4 over everything published.

    .venv/bin/python infra/bench/soak_cpu_path.py --events 10000 [--csv soak.csv]

Needs RabbitMQ on 127.0.0.1:5672 (infra/scripts/services.sh). Uses its own namespace and deletes
its queues at the end. The test suite runs the same code scaled down
(tests/reliability/test_faults.py::test_cpu_path_soak_memory_stays_bounded).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--photos", type=int, default=4, help="distinct photos (seeded once per tenant)")
    parser.add_argument("--tenants", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=500)
    parser.add_argument("--csv", type=Path, help="write every RSS sample here")
    args = parser.parse_args()

    from db import migrate
    from db.embedded import start_embedded
    from db.engine import make_engine
    from tasks.events import product_event_payload
    from tests.conftest import DATASET_DIR
    from tests.integration.harness import base_env, require_service
    from tests.reliability import summary
    from tests.reliability.harness import FaultDeployment
    from tests.reliability.soak import run_soak, start_soak_workers

    require_service(5672, "RabbitMQ", "start it (infra/scripts/services.sh)")
    rows = [line.split(",") for line in (DATASET_DIR / "manifest.csv").read_text().splitlines()[1:]]
    header = (DATASET_DIR / "manifest.csv").read_text().splitlines()[0].split(",")
    photos = [(DATASET_DIR / r[header.index("path")], r[header.index("category")]) for r in rows][: args.photos]

    def make_event(tenant: str, external_id: str, n: int, *, title: str | None = None) -> dict:
        path, category = photos[n % len(photos)]
        return product_event_payload(tenant_id=tenant, merchant_id="m1", external_id=external_id, version=1,
                                     category=category, image_urls=[path.as_uri()],
                                     title=title or f"{category} {external_id}",
                                     description="Photographed on a hanger.", attributes={"brand": "Acme"})

    work = Path(tempfile.mkdtemp(prefix="soak-"))
    url = start_embedded(work / "pgdata")
    engine = make_engine(url, pool_size=2)
    migrate.upgrade(engine)
    namespace = f"s{uuid.uuid4().hex[:10]}"
    (work / "data").mkdir()
    dep = FaultDeployment(env=base_env(pg_url=url, data_dir=work / "data", namespace=namespace),
                          data_dir=work / "data", namespace=namespace, engine=engine)
    tenants = [f"soak-{uuid.uuid4().hex[:8]}" for _ in range(args.tenants)]
    last = [0.0]

    def progress(s) -> None:  # noqa: ANN001
        if s.t_s - last[0] >= 30:
            last[0] = s.t_s
            print(f"  t={s.t_s:7.1f}s finished={s.finished:6d} rss={s.rss_mb:8.1f} MB", flush=True)

    try:
        start_soak_workers(dep)
        print(f"soak: {args.events} events, {args.tenants} tenants, {args.photos} photos, workers up; data in {work}",
              flush=True)
        result = run_soak(dep, make_event, events=args.events, photos=args.photos, tenants=tenants,
                          chunk=args.chunk, sample_every_s=2.0, timeout=4 * 3600, progress=progress)
        report = dep.check(f"8 CPU-path soak ({args.events} events)", timeout=120)
    finally:
        dep.stop_workers(timeout=30)
        dep.delete_broker_objects()
    print(f"\n{args.events} events in {result.seconds:.0f}s = {result.events_per_s:.1f} events/s; "
          f"model batches during the soak: {result.model_batches_during}")
    print(f"CPU worker RSS (main + prefork children): at 10% {result.rss_at(0.1):.1f} MB, 25% {result.rss_at(0.25):.1f}, "
          f"50% {result.rss_at(0.5):.1f}, 100% {result.rss_at(1.0):.1f}; peak {result.peak_mb:.1f}")
    print(result.table(rows=20))
    print(f"\ninvariants: lost={report.lost} duplicated={report.duplicated} redelivered={report.redelivered}")
    print(summary.render())
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["t_s", "finished", "rss_mb"])
            w.writerows([(s.t_s, s.finished, round(s.rss_mb, 1)) for s in result.samples])
    grew = result.rss_at(1.0) - result.rss_at(0.25)
    ok = report.ok and result.model_batches_during == 0 and grew < 128
    print("OK" if ok else f"FAILED (RSS growth after warm-up {grew:.0f} MB)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
