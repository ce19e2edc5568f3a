"""W3C trace context through the queue: parsed at intake, kept on the job, sent on every message.

An incoming ``traceparent`` (and ``tracestate``) AMQP header is parsed here (an invalid one is
ignored, never an error); intake binds it while it creates the job (``jobs.create`` stores it in
the job's work), the outbox copies the current context onto each row it writes (a stage's task
message, ``listing.enriched`` / ``listing.failed``) and the publisher sends it as headers. Each
stage task runs in ``stage_span``: with the OpenTelemetry SDK configured (``configure``, from the
standard ``OTEL_*`` variables) that is a real span, child of the incoming context; without it the
context still travels unchanged, so a trace started upstream is never cut.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import structlog

log = structlog.get_logger(__name__)

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
MAX_TRACESTATE = 512


@dataclass(frozen=True)
class TraceContext:
    traceparent: str
    tracestate: str | None = None

    @property
    def trace_id(self) -> str:
        return self.traceparent.split("-")[1]

    def headers(self) -> dict[str, str]:
        out = {"traceparent": self.traceparent}
        if self.tracestate:
            out["tracestate"] = self.tracestate
        return out


def parse(traceparent: Any, tracestate: Any = None) -> TraceContext | None:
    """A valid W3C trace context, or None (absent, malformed, all-zero ids, version ff)."""
    if isinstance(traceparent, bytes):
        traceparent = traceparent.decode("ascii", "replace")
    if not isinstance(traceparent, str):
        return None
    match = _TRACEPARENT.match(traceparent.strip())
    if match is None:
        return None
    version, trace_id, span_id, _flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or set(trace_id) == {"0"} or set(span_id) == {"0"}:
        return None
    if isinstance(tracestate, bytes):
        tracestate = tracestate.decode("ascii", "replace")
    state = tracestate.strip() if isinstance(tracestate, str) and 0 < len(tracestate.strip()) <= MAX_TRACESTATE \
        else None
    return TraceContext(match.group(0)[:55], state)


def from_headers(headers: Mapping[str, Any] | None) -> TraceContext | None:
    headers = headers or {}
    return parse(headers.get("traceparent"), headers.get("tracestate"))


_current: contextvars.ContextVar[TraceContext | None] = contextvars.ContextVar("trace_context", default=None)


def current() -> TraceContext | None:
    return _current.get()


@contextmanager
def bound(context: TraceContext | None) -> Iterator[None]:
    """Make ``context`` the current one for the block (intake; a stage without a tracer)."""
    token = _current.set(context)
    try:
        yield
    finally:
        _current.reset(token)


# ---- the OpenTelemetry SDK (optional: the ``tracing`` extra) -------------------------------------
_tracer: Any = None


def configure(enabled: bool, *, service_name: str, exporter: Any = None) -> bool:
    """Install a tracer provider exporting with OTLP (the ``OTEL_EXPORTER_OTLP_*`` variables), or with
    ``exporter`` (tests). False when off or when the SDK is not installed (one info line)."""
    global _tracer
    if not enabled and exporter is None:
        _tracer = None
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError:
        log.info("tracing.sdk_missing", hint="pip install 'catalog-enrich[tracing]'")
        _tracer = None
        return False
    resource = Resource.create()  # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES win over our default name
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": service_name}))
    provider = TracerProvider(resource=resource)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _tracer = provider.get_tracer("catalog-enrich")
    return True


@contextmanager
def stage_span(name: str, incoming: TraceContext | None, **attributes: Any) -> Iterator[Any]:
    """One span per stage run (child of ``incoming``); inside it the current context is the span's."""
    if _tracer is None:
        with bound(incoming):
            yield None
        return
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    propagator = TraceContextTextMapPropagator()
    parent = propagator.extract(incoming.headers()) if incoming else None
    clean = {k: v for k, v in attributes.items() if isinstance(v, str | int | float | bool)}
    with _tracer.start_as_current_span(name, context=parent, attributes=clean) as span:
        carrier: dict[str, str] = {}
        propagator.inject(carrier)
        with bound(parse(carrier.get("traceparent"), carrier.get("tracestate"))):
            yield span


def annotate(**attributes: Any) -> None:
    """Attributes on the span of the stage running now (a no-op without a tracer): what only the
    stage function knows, such as the job's tenant or the model versions of its result."""
    if _tracer is None:
        return
    from opentelemetry import trace

    set_attributes(trace.get_current_span(), **attributes)


def set_attributes(span: Any, **attributes: Any) -> None:
    if span is not None:
        for key, value in attributes.items():
            if isinstance(value, str | int | float | bool):
                span.set_attribute(key, value)


def log_trace_id(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: ``trace_id`` on every line logged while a trace context is current."""
    context = _current.get()
    if context is not None and "trace_id" not in event:
        event["trace_id"] = context.trace_id
    return event
