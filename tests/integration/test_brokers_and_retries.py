"""A transient S3 outage that heals (retried with backoff, then done), and the same pipeline on a
Redis broker (kombu virtual transport: no broker-side dead-lettering)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
from kombu import Connection, Exchange, Producer
from sqlalchemy import text

from tasks.events import product_event_payload
from tests.integration.harness import REDIS_URL, Deployment, TcpForwarder, base_env, free_port, require_service

pytestmark = pytest.mark.integration


def test_transient_s3_outage_succeeds_on_retry(rabbitmq, pg_url, engine, sample_photos, tmp_path: Path) -> None:  # noqa: ANN001
    from moto.server import ThreadedMotoServer

    port, moto_port = free_port(), free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port)  # the real S3 stand-in…
    server.start()
    endpoint = TcpForwarder(port, moto_port)  # …reachable only once the "outage" ends
    ns = f"t{uuid.uuid4().hex[:10]}"
    env = base_env(pg_url=pg_url, data_dir=tmp_path, namespace=ns,
                   ENRICH_STORAGE__S3_ENDPOINT_URL=f"http://127.0.0.1:{port}",
                   ENRICH_STORAGE__ALLOWED_BUCKETS='["merchant-photos"]',
                   ENRICH_WORKERS__RETRY_BACKOFF_S="1.0", ENRICH_WORKERS__MAX_RETRIES="6",
                   AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")
    dep = Deployment(env=env, data_dir=tmp_path, namespace=ns, engine=engine)
    try:
        import boto3

        path, cat = sample_photos[5]
        t = f"tenant-{uuid.uuid4().hex[:6]}"
        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{moto_port}", region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
        s3.create_bucket(Bucket="merchant-photos")
        s3.put_object(Bucket="merchant-photos", Key=f"{t}/m1/photo.jpg", Body=path.read_bytes(), ContentType="image/jpeg")
        dep.start_worker("events,cpu")
        dep.start_worker("gpu")
        payload = product_event_payload(tenant_id=t, merchant_id="m1", external_id="s3p", version=1, category=cat,
                                        image_urls=[f"s3://merchant-photos/{t}/m1/photo.jpg"])
        eid = dep.publish(payload)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the endpoint is down: the first attempt fails transiently
            if "stage.retry" in dep.logs():
                break
            time.sleep(0.2)
        else:
            raise AssertionError("fetch never attempted\n" + dep.logs())
        endpoint.start()  # the outage ends
        row = dep.wait_finished([eid], timeout=180)[eid]
        assert row.status == "done", (row.error_code, dep.logs())
        assert row.attempts["fetch"] >= 2  # failed at least once, then succeeded
        assert "image_fetch_failed" in dep.logs() and "stage.retry" in dep.logs()
    finally:
        dep.stop_workers()
        dep.delete_broker_objects()
        endpoint.stop()
        server.stop()


def test_pipeline_on_redis_broker(pg_url, engine, sample_photos, tmp_path: Path) -> None:  # noqa: ANN001
    require_service(6379, "Redis", "start it (redis-server) or run infra/scripts/services.sh")
    ns = f"r{uuid.uuid4().hex[:10]}"
    env = base_env(pg_url=pg_url, data_dir=tmp_path, namespace=ns, broker_url=REDIS_URL)
    dep = Deployment(env=env, data_dir=tmp_path, namespace=ns, engine=engine)
    t = f"tenant-{uuid.uuid4().hex[:6]}"
    try:
        dep.start_worker("events,cpu")
        dep.start_worker("gpu")
        ids = []
        with Connection(REDIS_URL) as conn:  # a backend on Redis publishes plain JSON with any Redis client/kombu
            producer = Producer(conn.channel(), exchange=Exchange(f"{ns}.events", type="topic"))
            for i, (path, cat) in enumerate(sample_photos[6:8]):
                p = product_event_payload(tenant_id=t, merchant_id="m1", external_id=f"r{i}", version=1,
                                          category=cat, image_urls=[path.as_uri()])
                producer.publish(json.dumps(p).encode(), routing_key="product.created", content_type="application/json",
                                 content_encoding="utf-8", declare=[])
                ids.append(uuid.UUID(p["event_id"]))
            bad = b'{"schema_version": 1, "event_id": "not-a-uuid"}'
            producer.publish(bad, routing_key="product.created", content_type="application/json", content_encoding="utf-8")
        rows = dep.wait_finished(ids)
        assert {r.status for r in rows.values()} == {"done"}, dep.logs()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # no broker DLX on Redis: the application keeps the dead letter
            with engine.connect() as conn:
                kept = conn.execute(text("SELECT reason FROM dead_letters WHERE queue = :q"),
                                    {"q": f"{ns}.product-events"}).scalars().all()
            if kept:
                break
            time.sleep(0.3)
        assert kept == ["invalid_event"]
    finally:
        dep.stop_workers()
