"""The integration harness (tests/integration/harness.py) with what fault scenarios need: worker
specs that can be restarted, a bounded supervisor that restarts killed workers, log probes, batch
publishing on one connection, accumulated listing.* messages, the invariants, and the summary."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import psutil
from sqlalchemy import text

from tests.integration.harness import AMQP_URL, REPO, Deployment
from tests.reliability import summary
from tests.reliability.invariants import InvariantReport, check_invariants, wait_for_messages


@dataclass(frozen=True)
class WorkerSpec:
    name: str
    queues: str
    extra_env: dict[str, str] = field(default_factory=dict)
    concurrency: int | None = None


@dataclass
class FaultDeployment(Deployment):
    max_restarts: int = 3
    specs: dict[str, WorkerSpec] = field(default_factory=dict)
    by_name: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    restarts: int = 0
    published: dict[uuid.UUID, str | None] = field(default_factory=dict)
    publish_count: int = 0
    messages: list[dict[str, Any]] = field(default_factory=list)
    tenants: set[str] = field(default_factory=set)

    # ---- workers -------------------------------------------------------------------------------
    def start(self, *specs: WorkerSpec, timeout: float = 120) -> None:
        """Start workers side by side (imports overlap on the 2 cores), then wait for each."""
        started = [(spec, self._spawn(spec)) for spec in specs]
        for spec, proc in started:
            self._wait_ready_since(spec.name, proc, timeout)

    def _spawn(self, spec: WorkerSpec) -> subprocess.Popen[bytes]:
        self.specs[spec.name] = spec
        log = self.log_path(spec.name)
        offset = log.stat().st_size if log.exists() else 0
        cmd = [sys.executable, "-m", "workers", "worker", "--queues", spec.queues, "--loglevel", "INFO",
               "--hostname", f"{spec.name}-{uuid.uuid4().hex[:6]}@test"]
        if spec.concurrency:
            cmd += ["--concurrency", str(spec.concurrency)]
        with open(log, "ab") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                                    env={**self.env, **spec.extra_env}, start_new_session=True)
        proc.log_offset = offset  # type: ignore[attr-defined]
        self.procs.append(proc)
        self.by_name[spec.name] = proc
        return proc

    def _wait_ready_since(self, name: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            tail = self.log_path(name).read_text(errors="replace")[proc.log_offset:]  # type: ignore[attr-defined]
            if proc.poll() is not None:
                raise AssertionError(f"worker {name} exited at start: {tail[-3000:]}")
            if " ready." in tail:
                return
            time.sleep(0.3)
        raise AssertionError(f"worker {name} not ready in {timeout}s")

    def log_path(self, name: str) -> Path:
        return self.data_dir / f"worker-{name}.log"

    def kill(self, name: str, sig: int = signal.SIGKILL, *, wait_s: float = 60) -> float:
        """Signal a worker's whole process group; returns how long it took to exit."""
        proc = self.by_name[name]
        started = time.monotonic()
        os.killpg(proc.pid, sig)
        proc.wait(wait_s)
        self.procs.remove(proc)
        return time.monotonic() - started

    def restart(self, name: str, *, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        old = self.specs[name]
        spec = WorkerSpec(name, old.queues, old.extra_env if extra_env is None else extra_env, old.concurrency)
        proc = self._spawn(spec)
        self._wait_ready_since(name, proc, 120)
        return proc

    def supervise(self) -> None:
        """Restart workers that died on their own, at most ``max_restarts`` times in all."""
        for name, proc in list(self.by_name.items()):
            if proc.poll() is None or proc not in self.procs:
                continue
            self.procs.remove(proc)
            if self.restarts >= self.max_restarts:
                raise AssertionError(f"worker {name} died and the restart budget ({self.max_restarts}) is spent\n"
                                     + self.logs())
            self.restarts += 1
            self.restart(name)

    def rss_bytes(self, name: str) -> int:
        """Resident memory of a worker: its main process and all its children."""
        proc = psutil.Process(self.by_name[name].pid)
        total = proc.memory_info().rss
        for child in proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    # ---- logs ----------------------------------------------------------------------------------
    def log_text(self, name: str | None = None) -> str:
        files = [self.log_path(name)] if name else sorted(self.data_dir.glob("worker-*.log"))
        return "\n".join(f.read_text(errors="replace") for f in files if f.exists())

    def count(self, pattern: str, name: str | None = None) -> int:
        return len(re.findall(pattern, self.log_text(name)))

    def wait_log(self, pattern: str, *, name: str | None = None, count: int = 1, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count(pattern, name) >= count:
                return
            self.supervise()
            time.sleep(0.2)
        raise AssertionError(f"{pattern!r} seen fewer than {count} times in {timeout}s\n" + self.logs())

    # ---- publishing ----------------------------------------------------------------------------
    def publish(self, payload: dict[str, Any]) -> uuid.UUID:
        return self.publish_many([payload])[0]

    def publish_many(self, payloads: Iterable[dict[str, Any]]) -> list[uuid.UUID]:
        """Publish on one connection with confirms; remembers each event and its tenant."""
        ids = []
        conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        try:
            ch = conn.channel()
            ch.confirm_delivery()
            for p in payloads:
                ch.basic_publish(exchange=f"{self.namespace}.events", routing_key=p["event_type"],
                                 body=json.dumps(p).encode(), mandatory=True,
                                 properties=pika.BasicProperties(content_type="application/json", delivery_mode=2,
                                                                 message_id=p["event_id"]))
                eid = uuid.UUID(p["event_id"])
                self.published[eid] = p["tenant_id"]
                self.tenants.add(p["tenant_id"])
                self.publish_count += 1
                ids.append(eid)
        finally:
            conn.close()
        return ids

    def send_task(self, task: str, job_id: int, queue: str) -> str:
        """Enqueue a stage task directly (as a duplicate would arrive), with a fresh task id."""
        from celery import Celery

        app = Celery("dup", broker=AMQP_URL)
        app.conf.update(task_serializer="json", broker_transport_options={"confirm_publish": True})
        task_id = str(uuid.uuid4())
        with app.connection_for_write() as conn:
            app.send_task(task, args=[job_id], task_id=task_id, exchange=f"{self.namespace}.tasks",
                          routing_key=queue, connection=conn)
        return task_id

    # ---- waiting and checking ------------------------------------------------------------------
    def wait_finished(self, event_ids: Iterable[uuid.UUID], timeout: float = 240) -> dict[uuid.UUID, Any]:
        ids = list(event_ids)
        deadline = time.monotonic() + timeout
        done: dict[uuid.UUID, Any] = {}
        while time.monotonic() < deadline:
            done = {r.event_id: r for r in self.job_rows(ids)
                    if r.inbox != "accepted" or r.status in ("done", "failed", "superseded")}
            if len(done) == len(ids):
                return done
            self.supervise()
            time.sleep(0.4)
        raise AssertionError(f"{len(ids) - len(done)} of {len(ids)} events not finished in {timeout}s\n" + self.logs())

    def job_rows(self, ids: list[uuid.UUID]) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(text(
                "SELECT i.event_id, i.status AS inbox, j.id AS job_id, j.status, j.stage, j.error_code, j.retryable,"
                "       j.attempts, j.timings_ms, j.listing_id, j.work, j.created_at, j.finished_at"
                "  FROM inbox_events i LEFT JOIN enrichment_jobs j ON j.event_id = i.event_id"
                " WHERE i.event_id = ANY(:ids)"), {"ids": ids}).all())

    def check(self, scenario: str, *, note: str = "", timeout: float = 30) -> InvariantReport:
        """Collect the listing.* messages, check I1–I4 over everything published, record the row."""
        wait_for_messages(self.drain_listing_events, self.messages, self.published, timeout=timeout)
        report = check_invariants(self.engine, self.published, self.messages, self.tenants)
        summary.record(scenario, published=self.publish_count, done=report.done, failed_by_code=report.failed_by_code,
                       rejected=report.rejected, lost=report.lost, duplicated=report.duplicated,
                       note=note or (f"redelivered={report.redelivered}" if report.redelivered else ""))
        assert report.ok, report.explain() + "\n" + self.logs()[-6000:]
        return report
