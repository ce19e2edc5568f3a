"""W3C trace context: parsing (an invalid header is ignored, never an error), the stage span as a
child of the incoming context (real OpenTelemetry SDK, in-memory exporter), the context on the
log lines and on what the publisher sends."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tasks import tracing
from tasks.pipeline.outbox import HEADERS_KEY
from tasks.pipeline.work import JobTrace
from workers.publisher import KombuEventPublisher
from workers.settings import Settings

TRACE_ID, SPAN_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{SPAN_ID}-01"


def test_a_valid_traceparent_and_tracestate_are_kept() -> None:
    ctx = tracing.parse(TRACEPARENT, "vendor=abc,other=1")
    assert ctx == tracing.TraceContext(TRACEPARENT, "vendor=abc,other=1")
    assert ctx.trace_id == TRACE_ID
    assert tracing.parse(TRACEPARENT.encode(), b"v=1") == tracing.TraceContext(TRACEPARENT, "v=1")
    assert tracing.from_headers({"traceparent": TRACEPARENT, "tracestate": "x" * 600}).tracestate is None


@pytest.mark.parametrize("bad", [
    None, 17, "", "garbage", b"\xff\xfe", TRACEPARENT.upper(), f"00-{TRACE_ID}-{SPAN_ID}",
    f"00-{'0' * 32}-{SPAN_ID}-01", f"00-{TRACE_ID}-{'0' * 16}-01", f"ff-{TRACE_ID}-{SPAN_ID}-01",
    f"00-{TRACE_ID}-{SPAN_ID}-01-extra", f"00-{TRACE_ID[:-1]}-{SPAN_ID}-01",
])
def test_an_invalid_traceparent_is_ignored(bad: Any) -> None:
    assert tracing.parse(bad, "vendor=abc") is None
    assert tracing.from_headers({"traceparent": bad}) is None
    assert tracing.from_headers(None) is None


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    assert tracing.configure(False, service_name="test", exporter=spans)
    yield spans
    tracing.configure(False, service_name="test")


def test_each_stage_span_continues_the_incoming_trace(exporter: InMemorySpanExporter) -> None:
    incoming = tracing.parse(TRACEPARENT)
    seen: list[tracing.TraceContext | None] = []
    for stage in ("fetch", "model", "persist"):
        with tracing.stage_span(f"catalog.{stage}", incoming, **{"catalog.job_id": 7, "catalog.stage": stage,
                                                                 "ignored": object()}):
            seen.append(tracing.current())
        incoming = seen[-1]  # what the stage handed on: its task message's traceparent
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["catalog.fetch", "catalog.model", "catalog.persist"]
    assert {format(s.context.trace_id, "032x") for s in spans} == {TRACE_ID}
    assert format(spans[0].parent.span_id, "016x") == SPAN_ID
    assert spans[1].parent.span_id == spans[0].context.span_id  # a chain, stage after stage
    assert dict(spans[2].attributes) == {"catalog.job_id": 7, "catalog.stage": "persist"}
    assert all(c is not None and c.trace_id == TRACE_ID for c in seen)
    assert tracing.current() is None


def test_without_a_tracer_the_context_travels_unchanged() -> None:
    tracing.configure(False, service_name="test")
    incoming = tracing.parse(TRACEPARENT)
    with tracing.stage_span("catalog.fetch", incoming) as span:
        assert span is None and tracing.current() == incoming


def test_log_lines_carry_the_trace_id() -> None:
    with tracing.bound(tracing.parse(TRACEPARENT)):
        assert tracing.log_trace_id(None, "info", {"event": "x"})["trace_id"] == TRACE_ID
    assert "trace_id" not in tracing.log_trace_id(None, "info", {"event": "x"})


def test_the_job_work_keeps_the_trace() -> None:
    work = JobTrace(TRACEPARENT, "v=1").to_work()
    assert JobTrace.of(work) == JobTrace(TRACEPARENT, "v=1")
    assert JobTrace.of({"image_urls": []}) is None


def test_the_publisher_sends_the_headers_and_not_in_the_body() -> None:
    sent: list[dict[str, Any]] = []
    publisher = KombuEventPublisher(Settings(broker={"url": "memory://"}),
                                    lambda name, **options: sent.append({"name": name, **options}))
    publisher.publish("task:catalog.fetch", {"task": "catalog.fetch", "args": [3], "queue": "cpu",
                                             HEADERS_KEY: {"traceparent": TRACEPARENT}}, message_id="m")
    assert sent[0]["headers"] == {"traceparent": TRACEPARENT} and sent[0]["args"] == [3]
