"""A product event's W3C trace context reaches every stage and the published event: intake stores
it on the job, every hand-off in the outbox carries it as a header, and each stage, run as its
Celery task runs it (``tracing.stage_span`` continuing the header of the message that started it),
is a span of the same trace; ``listing.enriched`` leaves with it.

The real stage functions as ``enrich_worker`` under forced row-level security (stand-in fetcher and
batcher from ``test_superseded``); an in-memory span exporter stands in for the OTLP endpoint."""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from db.engine import tenant_session
from db.tables import OutboxMessage
from tasks import tracing
from tasks.events import parse_product_event, product_event_payload
from tasks.pipeline.fetch import fetch_and_dedup
from tasks.pipeline.intake import accept_product_event
from tasks.pipeline.model import model_stage
from tasks.pipeline.outbox import HEADERS_KEY
from tasks.pipeline.persist import persist
from tests.tasks.pipeline.test_superseded import TENANT, V1_URL, pipeline  # noqa: F401  (fixture)

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.configure(False, service_name="test", exporter=exporter)
    yield exporter
    tracing.configure(False, service_name="test")


def _outbox(env: SimpleNamespace) -> list[OutboxMessage]:
    with tenant_session(env.factory, TENANT) as session:
        rows = session.query(OutboxMessage).filter_by(tenant_id=TENANT).order_by(OutboxMessage.id).all()
        session.expunge_all()
        return rows


def test_the_incoming_trace_is_on_every_stage_span_and_on_the_published_event(
        pipeline: SimpleNamespace, spans: InMemorySpanExporter) -> None:  # noqa: F811
    env = pipeline
    payload = product_event_payload(tenant_id=TENANT, merchant_id="m1", external_id="sku-t", version=1,
                                    category="dress", image_urls=[V1_URL], title="Traced dress", description="",
                                    attributes={})
    event = parse_product_event(json.dumps(payload).encode(), "application/json", "product.created")
    with tracing.bound(tracing.parse(TRACEPARENT)), tenant_session(env.factory, TENANT) as session:
        job_id = accept_product_event(session, event).job_id  # as workers.intake binds the AMQP header
    assert job_id is not None
    stages = [("catalog.fetch", lambda: fetch_and_dedup(env.runtime, job_id, "t-fetch")),
              ("catalog.model", lambda: model_stage(env.runtime, job_id, "t-model")),
              ("catalog.persist", lambda: persist(env.runtime, job_id, "t-persist"))]
    for name, run in stages:
        [task] = [r for r in _outbox(env) if r.routing_key == f"task:{name}"]  # the message that starts it
        headers = task.payload[HEADERS_KEY]
        assert headers["traceparent"].split("-")[1] == TRACE_ID
        with tracing.stage_span(name, tracing.from_headers(headers), **{"catalog.job_id": job_id}):
            run()
    finished = {s.name: s for s in spans.get_finished_spans()}
    assert set(finished) == {name for name, _ in stages}
    assert {format(s.context.trace_id, "032x") for s in finished.values()} == {TRACE_ID}
    assert all(s.attributes["catalog.job_id"] == job_id for s in finished.values())
    assert all(s.attributes["catalog.tenant_id"] == TENANT for s in finished.values())  # set at each claim
    for name in ("catalog.model", "catalog.persist"):  # the versions that produced the listing
        assert {k for k in finished[name].attributes if k.startswith("catalog.model_version.")} == {
            f"catalog.model_version.{kind}" for kind in ("detector", "vlm", "clip")}
    # Each stage is the child of the span that handed the job on (fetch: of the producer's span).
    assert format(finished["catalog.fetch"].parent.span_id, "016x") == TRACEPARENT.split("-")[2]
    assert finished["catalog.model"].parent.span_id == finished["catalog.fetch"].context.span_id
    assert finished["catalog.persist"].parent.span_id == finished["catalog.model"].context.span_id
    [enriched] = [r for r in _outbox(env) if r.routing_key == "listing.enriched"]
    assert enriched.payload[HEADERS_KEY]["traceparent"].split("-")[1] == TRACE_ID
