"""The Prometheus endpoint of a worker process: multiprocess mode, the scrape-time collectors.

The definitions and the hooks that record them are in ``tasks.metrics``. Here a worker process
tree (a Celery worker and its prefork children, the standalone intake, beat) gets its own
``PROMETHEUS_MULTIPROC_DIR`` (``<metrics dir>/<role>-<port>``, emptied at start: counters of a
previous run of the same tree must not be added to this one's), and its parent serves every
process's files on ``ENRICH_METRICS__PORT`` + the role's offset. A prefork child that exits is
marked dead, so its live gauges leave the sum. Processes that read the broker and the database
anyway (beat and the events intake) also export, at scrape time, the AMQP queue depths and the
outbox backlog; the GPU worker exports its accelerator's memory.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from workers.logs import get_logger
from workers.settings import Settings, export_metrics_dir

log = get_logger(__name__)

_dir: Path | None = None  # this process tree's multiprocess directory, once started


def role_of(queues: list[str]) -> str:
    """The role that names a worker's port: gpu, then cpu (events,cpu included), else events."""
    return next((r for r in ("gpu", "cpu") if r in queues), "events")


def start(settings: Settings, role: str, *, broker: bool = False) -> int | None:
    """Serve this process tree's metrics; the port, or None when metrics are off."""
    global _dir
    if not settings.metrics.enabled:
        return None
    port = settings.metrics.port_for(role)
    path = settings.metrics_dir / f"{role}-{port}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    export_metrics_dir(path)
    from prometheus_client import CollectorRegistry, start_http_server, values
    from prometheus_client.multiprocess import MultiProcessCollector

    values.ValueClass = values.get_value_class()  # chosen at import: re-chosen now the directory is set
    _dir = path
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(path))
    if broker:
        registry.register(BacklogCollector(settings))
    if role == "gpu":
        registry.register(GpuMemoryCollector())
    start_http_server(port, addr=settings.metrics.host, registry=registry)
    log.info("metrics.serving", role=role, port=port, multiproc_dir=str(path))
    return port


def child_exited(pid: int) -> None:
    """A prefork child ended: its live gauges no longer count."""
    if _dir is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path=str(_dir))


class BacklogCollector:
    """Queue depths (management API, else passive declares) and the outbox backlog, at scrape time;
    cached for a few seconds so several scrapers cost one look."""

    ttl_s = 5.0

    def __init__(self, settings: Settings) -> None:
        from workers.broker import broker_kind, broker_url
        from workers.topology import build_topology

        self._url = broker_url(settings)
        self._rabbit = broker_kind(self._url) == "rabbitmq"
        self._queues = [q.name for q in build_topology(settings, rabbitmq=self._rabbit).all_queues]
        self._api = settings.metrics.broker_api_url or (management_url(self._url) if self._rabbit else None)
        self._cached: tuple[float, list[Any]] = (0.0, [])

    def describe(self) -> list[Any]:
        return []  # collected on scrape only: registering must not reach the broker

    def collect(self) -> Iterator[Any]:
        at, families = self._cached
        if time.monotonic() - at > self.ttl_s:
            families = self._families()
            self._cached = (time.monotonic(), families)
        yield from families

    def _families(self) -> list[Any]:
        from prometheus_client.core import GaugeMetricFamily

        messages = GaugeMetricFamily("catalog_queue_messages", "Messages in an AMQP queue (ready + unacked).",
                                     labels=["queue"])
        consumers = GaugeMetricFamily("catalog_queue_consumers", "Consumers of an AMQP queue.", labels=["queue"])
        for name, (count, consuming) in self._depths().items():
            messages.add_metric([name], count)
            consumers.add_metric([name], consuming)
        out = [messages, consumers]
        pending = _outbox_pending()
        if pending is not None:
            out.append(GaugeMetricFamily("catalog_outbox_backlog", "Unpublished outbox rows.", value=pending))
        return out

    def _depths(self) -> dict[str, tuple[int, int]]:
        if self._api:
            try:
                return queue_depths_from_api(self._api, self._queues)
            except Exception as exc:  # noqa: BLE001 - no management plugin: passive declares
                log.debug("metrics.management_api_unavailable", error=str(exc)[:200])
        try:
            return queue_depths_by_declare(self._url, self._queues)
        except Exception as exc:  # noqa: BLE001 - a scrape never fails on the broker
            log.warning("metrics.queue_depths_unavailable", error=str(exc)[:200])
            return {}


def management_url(amqp_url: str) -> str:
    """amqp://user:pass@host:5672/vhost → http://user:pass@host:15672/#vhost (the vhost after #)."""
    parts = urllib.parse.urlsplit(amqp_url)
    vhost = urllib.parse.unquote(parts.path.lstrip("/")) or "/"
    auth = f"{parts.username or 'guest'}:{parts.password or 'guest'}@"
    return f"http://{auth}{parts.hostname or 'localhost'}:15672/#{vhost}"


def queue_depths_from_api(api: str, names: list[str], timeout_s: float = 2.0) -> dict[str, tuple[int, int]]:
    base, _, vhost = api.partition("#")
    parts = urllib.parse.urlsplit(base)
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
    url = urllib.parse.urlunsplit((parts.scheme, netloc, "/api/queues/" + urllib.parse.quote(vhost or "/", safe=""),
                                   "columns=name,messages,consumers", ""))
    request = urllib.request.Request(url)
    if parts.username:
        import base64

        token = base64.b64encode(f"{urllib.parse.unquote(parts.username)}:"
                                 f"{urllib.parse.unquote(parts.password or '')}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 - an operator's URL
        rows = json.loads(response.read())
    wanted = set(names)
    return {r["name"]: (int(r.get("messages") or 0), int(r.get("consumers") or 0)) for r in rows if r["name"] in wanted}


def queue_depths_by_declare(broker: str, names: list[str]) -> dict[str, tuple[int, int]]:
    from kombu import Connection

    out: dict[str, tuple[int, int]] = {}
    with Connection(broker, connect_timeout=3) as conn:
        channel = conn.channel()
        for name in names:
            try:
                _, count, consuming = channel.queue_declare(queue=name, passive=True)
            except Exception:  # noqa: BLE001 - not declared (yet): the channel is closed, take another
                channel = conn.channel()
                continue
            out[name] = (int(count), int(consuming))
    return out


def _outbox_pending() -> int | None:
    try:
        from db.engine import system_session
        from db.repositories import reports
        from workers.database import get_session_factory

        with system_session(get_session_factory()) as session:
            return int(reports.outbox_pending(session))
    except Exception as exc:  # noqa: BLE001 - a scrape never fails on the database
        log.warning("metrics.outbox_unavailable", error=str(exc)[:200])
        return None


class GpuMemoryCollector:
    """Accelerator memory of this process, once torch has initialised CUDA (never imports torch)."""

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily("catalog_gpu_memory_bytes", "CUDA memory of this worker process.",
                                   labels=["device", "kind"])
        for index in range(torch.cuda.device_count()):
            device = f"cuda:{index}"
            family.add_metric([device, "allocated"], float(torch.cuda.memory_allocated(index)))
            family.add_metric([device, "reserved"], float(torch.cuda.memory_reserved(index)))
            family.add_metric([device, "max_allocated"], float(torch.cuda.max_memory_allocated(index)))
        yield family
