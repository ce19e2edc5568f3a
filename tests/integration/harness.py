"""A real deployment in miniature: RabbitMQ (or Redis), Celery worker subprocesses, the embedded
Postgres, and a plain AMQP publisher/consumer standing in for the marketplace backend."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import pytest
from sqlalchemy import Engine, text

REPO = Path(__file__).resolve().parents[2]
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
REDIS_URL = "redis://127.0.0.1:6379/15"


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def require_service(port: int, name: str, how: str) -> None:
    if not port_open(port):
        pytest.fail(f"{name} is not reachable on 127.0.0.1:{port}: {how}", pytrace=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Deployment:
    env: dict[str, str]
    data_dir: Path
    namespace: str
    engine: Engine
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    # ---- workers -------------------------------------------------------------------------
    def start_worker(self, queues: str, *, name: str | None = None, extra_env: dict[str, str] | None = None,
                     concurrency: int | None = None) -> subprocess.Popen[bytes]:
        name = name or queues.replace(",", "-")
        log = open(self.data_dir / f"worker-{name}.log", "ab")  # noqa: SIM115
        cmd = [sys.executable, "-m", "workers", "worker", "--queues", queues, "--loglevel", "INFO",
               "--hostname", f"{name}-{uuid.uuid4().hex[:6]}@test"]
        if concurrency:
            cmd += ["--concurrency", str(concurrency)]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**self.env, **(extra_env or {})}, start_new_session=True)
        self.procs.append(proc)
        self._wait_ready(name, proc)
        return proc

    def start_beat(self, *, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """``enrich beat``, logging to worker-beat.log; ready once its scheduler started."""
        log = open(self.data_dir / "worker-beat.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen([sys.executable, "-m", "workers", "beat"], stdout=log, stderr=subprocess.STDOUT,
                                cwd=REPO, env={**self.env, **(extra_env or {})}, start_new_session=True)
        self.procs.append(proc)
        self._wait_ready("beat", proc, markers=("beat: Starting",))
        return proc

    def _wait_ready(self, name: str, proc: subprocess.Popen[bytes], timeout: float = 90,
                    markers: tuple[str, ...] = ("ready.", "intake_only")) -> None:
        logfile = self.data_dir / f"worker-{name}.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"worker {name} exited: {logfile.read_text()[-3000:]}")
            if any(m in logfile.read_text(errors="replace") for m in markers):
                return
            time.sleep(0.3)
        raise AssertionError(f"worker {name} not ready in {timeout}s: {logfile.read_text()[-3000:]}")

    def stop_workers(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, sig)
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        self.procs.clear()

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in self.data_dir.glob("worker-*.log"))

    # ---- the marketplace backend's side: plain AMQP ------------------------------------------
    def publish_raw(self, body: bytes, routing_key: str, *, content_type: str = "application/json",
                    message_id: str | None = None) -> None:
        conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        try:
            ch = conn.channel()
            ch.confirm_delivery()
            ch.basic_publish(exchange=f"{self.namespace}.events", routing_key=routing_key, body=body,
                             properties=pika.BasicProperties(content_type=content_type, delivery_mode=2,
                                                             message_id=message_id), mandatory=True)
        finally:
            conn.close()

    def publish(self, payload: dict[str, Any]) -> uuid.UUID:
        self.publish_raw(json.dumps(payload).encode(), payload["event_type"], message_id=payload["event_id"])
        return uuid.UUID(payload["event_id"])

    def drain_listing_events(self) -> list[dict[str, Any]]:
        """Everything published on listing.* so far (the backend's queue), consumed and acked."""
        conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        out = []
        try:
            ch = conn.channel()
            while True:
                method, props, body = ch.basic_get(f"{self.namespace}.listing-events", auto_ack=True)
                if method is None:
                    break
                assert props.content_type == "application/json"
                out.append(json.loads(body))
        finally:
            conn.close()
        return out

    # ---- waiting on the database -------------------------------------------------------------
    def wait_finished(self, event_ids: Iterable[uuid.UUID], timeout: float = 240) -> dict[uuid.UUID, Any]:
        ids = list(event_ids)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.engine.connect() as conn:
                rows = conn.execute(text(
                    "SELECT i.event_id, i.status AS inbox, j.id AS job_id, j.status, j.error_code, j.attempts,"
                    "       j.timings_ms, j.listing_id, j.work FROM inbox_events i"
                    "  LEFT JOIN enrichment_jobs j ON j.event_id = i.event_id WHERE i.event_id = ANY(:ids)"),
                    {"ids": ids}).all()
            done = {r.event_id: r for r in rows if r.inbox != "accepted" or r.status in ("done", "failed", "superseded")}
            if len(done) == len(ids):
                return done
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise AssertionError("a worker died:\n" + self.logs())
            time.sleep(0.5)
        raise AssertionError(f"{len(ids) - len(done)} of {len(ids)} events not finished in {timeout}s\n" + self.logs())

    def delete_broker_objects(self) -> None:
        from kombu import Connection

        from workers.settings import Settings
        from workers.topology import build_topology

        topo = build_topology(Settings(broker={"namespace": self.namespace}), rabbitmq=True)
        with Connection(AMQP_URL) as conn:
            ch = conn.channel()
            for q in topo.all_queues:
                try:
                    ch.queue_delete(q.name)
                except Exception:  # noqa: BLE001
                    ch = conn.channel()
            for ex in (topo.events, topo.tasks, topo.dead_letter):
                try:
                    ch.exchange_delete(ex.name)
                except Exception:  # noqa: BLE001
                    ch = conn.channel()


@contextmanager
def running_deployment(*, env: dict[str, str], data_dir: Path, namespace: str, engine: Engine) -> Iterator[Deployment]:
    """An events+cpu worker and a gpu worker up for the block; workers and broker objects gone after."""
    dep = Deployment(env=env, data_dir=data_dir, namespace=namespace, engine=engine)
    try:
        dep.start_worker("events,cpu")
        dep.start_worker("gpu")
        yield dep
    finally:
        dep.stop_workers()
        dep.delete_broker_objects()


def base_env(*, pg_url: str, data_dir: Path, namespace: str, broker_url: str = AMQP_URL,
             **overrides: str) -> dict[str, str]:
    """The deployment's environment, as production sets it: the workers ``SET ROLE enrich_worker``
    (forced row-level security applies, although the test database's login is a superuser) and
    the ``enrich`` maintenance commands run with this env switch to ``enrich_admin`` (the default
    ``ENRICH_DB__ADMIN_ROLE``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENRICH_")}
    env.update({
        "ENRICH_DB__URL": pg_url,
        "ENRICH_DB__RUNTIME_ROLE": "enrich_worker",
        "ENRICH_BROKER__URL": broker_url,
        "ENRICH_BROKER__NAMESPACE": namespace,
        "ENRICH_DATA_DIR": str(data_dir),
        "ENRICH_MODELS__PROFILE": "tiny",
        "ENRICH_MODELS__MAX_NEW_TOKENS": "64",
        "ENRICH_STORAGE__ALLOW_FILE_URLS": "true",
        "ENRICH_WORKERS__BATCH_SIZE": "4",
        "ENRICH_WORKERS__BATCH_MAX_WAIT_MS": "300",
        "ENRICH_WORKERS__MAX_RETRIES": "4",
        "ENRICH_WORKERS__RETRY_BACKOFF_S": "0.5",
        "ENRICH_WORKERS__RETRY_BACKOFF_MAX_S": "3",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(REPO),
    })
    env.update(overrides)
    return env


class TcpForwarder:
    """127.0.0.1:<port> → 127.0.0.1:<target>, started on demand: an endpoint that is down until
    the test decides it comes back."""

    def __init__(self, port: int, target: int) -> None:
        import threading

        self.port, self.target = port, target
        self._sock: socket.socket | None = None
        self._threading = threading

    def start(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(16)
        self._sock = sock
        self._threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self._sock is not None:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                self._threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
