"""A real Prometheus server (Debian's package) scrapes real worker processes during a small
pipeline run; what it stored is read back through its HTTP API."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

from tasks.events import product_event_payload
from tests.integration.conftest import tenant
from tests.integration.harness import Deployment, base_env, free_port, port_open

pytestmark = pytest.mark.integration
PROMETHEUS = shutil.which("prometheus")


def metrics_base_port() -> int:
    """A base port whose three role ports (cpu +1, gpu +2, beat +3) are free."""
    for _ in range(50):
        base = free_port()
        if base < 65_000 and not any(port_open(base + i) for i in range(1, 4)):
            return base
    raise AssertionError("no four free ports in a row")


def start_prometheus(data_dir: Path, targets: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    config = data_dir / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms"},
        "scrape_configs": [{"job_name": "catalog-workers", "static_configs": [{"targets": targets}]}]}))
    log = open(data_dir / "prometheus.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={data_dir / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 20
    while not port_open(port):
        assert proc.poll() is None and time.monotonic() < deadline, (data_dir / "prometheus.log").read_text()[-2000:]
        time.sleep(0.2)
    return proc, port


def query(port: int, promql: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def value(port: int, promql: str) -> float | None:
    result = query(port, promql)
    return float(result[0]["value"][1]) if result else None


def wait_value(port: int, promql: str, expected: float, timeout: float = 20) -> float | None:
    deadline = time.monotonic() + timeout
    while (got := value(port, promql)) != expected and time.monotonic() < deadline:
        time.sleep(0.5)
    return got


@pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary (infra/scripts/test.sh installs Debian's)")
def test_prometheus_scrapes_stage_histograms_and_job_counters(rabbitmq, pg_url, engine, sample_photos,  # noqa: ANN001
                                                              tmp_path: Path) -> None:
    started = time.monotonic()
    namespace = f"t{uuid.uuid4().hex[:10]}"
    base = metrics_base_port()
    env = base_env(pg_url=pg_url, data_dir=tmp_path, namespace=namespace, ENRICH_METRICS__ENABLED="true",
                   ENRICH_METRICS__PORT=str(base), ENRICH_METRICS__HOST="127.0.0.1")
    dep = Deployment(env=env, data_dir=tmp_path, namespace=namespace, engine=engine)
    prometheus = None
    try:
        dep.start_worker("events,cpu")
        dep.start_worker("gpu")
        dep.start_beat()
        prometheus, port = start_prometheus(tmp_path, [f"127.0.0.1:{base + i}" for i in (1, 2, 3)])
        assert wait_value(port, 'count(up{job="catalog-workers"} == 1)', 3) == 3, "a worker was not scraped"
        t = tenant()
        photos = sample_photos[:3]
        ids = [dep.publish(product_event_payload(
            tenant_id=t, merchant_id="m1", external_id=f"p{i}", version=1, category=cat,
            image_urls=[path.as_uri()], title=f"{cat} {i}", description="On a hanger.", attributes={}))
            for i, (path, cat) in enumerate(photos)]
        dep.publish_raw(b"{not json", "product.created")  # refused: invalid_event
        rows = dep.wait_finished(ids, timeout=60)
        assert {r.status for r in rows.values()} == {"done"}, [(r.status, r.error_code) for r in rows.values()]

        assert wait_value(port, 'sum(catalog_events_accepted_total{kind="product"})', 3) == 3
        assert wait_value(port, 'sum(catalog_events_refused_total{kind="product",code="invalid_event"})', 1) == 1
        assert wait_value(port, 'sum(catalog_jobs_finished_total{outcome="done"})', 3) == 3
        assert value(port, 'sum(catalog_jobs_finished_total{outcome="failed"})') is None
        for stage in ("fetch", "dedup", "ground", "describe", "verify", "embed", "persist"):
            assert wait_value(port, f'sum(catalog_stage_duration_seconds_count{{stage="{stage}"}})', 3) == 3, stage
        # fetch and persist run on the cpu worker, the model stage on the gpu worker: both scraped
        # A task's own duration is recorded after its hand-off is relayed, so the last model task's
        # can land a scrape after the job finished: wait for it rather than read one scrape.
        deadline = time.monotonic() + 20
        while True:
            by_instance = {r["metric"]["instance"]: float(r["value"][1]) for r in query(
                port, "sum by (instance) (catalog_stage_task_duration_seconds_count)")}
            done = by_instance.get(f"127.0.0.1:{base + 1}", 0) >= 6 and by_instance.get(f"127.0.0.1:{base + 2}", 0) >= 3
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert done, by_instance
        assert wait_value(port, 'sum(catalog_stage_queue_wait_seconds_count{stage="persist"})', 3) == 3
        batched = value(port, "sum(catalog_model_batch_size_sum)")
        assert batched == 3, batched  # every product went through exactly one micro-batch
        assert value(port, 'count(catalog_model_load_seconds_count{kind=~"detector|clip|vlm"})') == 3
        assert (value(port, 'sum(catalog_outbox_relayed_total{kind="event"})') or 0) >= 3
        # beat exports the queue depths (passive declares: this RabbitMQ may lack the management API)
        cpu_queue = query(port, f'catalog_queue_consumers{{queue="{namespace}.cpu"}}')
        assert cpu_queue and float(cpu_queue[0]["value"][1]) >= 1
        assert value(port, "catalog_outbox_backlog") is not None
        assert time.monotonic() - started < 90
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(10)
        dep.stop_workers()
        dep.delete_broker_objects()
