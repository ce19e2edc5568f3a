"""Hostile-input suite: one deployment for the whole package, running as the production would.

The workers run as the non-owner runtime role (``ENRICH_DB__RUNTIME_ROLE=enrich_worker``) with
row-level security forced, the default image-fetch policy (no private addresses, no plain HTTP;
file:// allowed only for the real test photos), one allowed S3 bucket and no S3 endpoint that
that answers (a counting listener): every S3 reference these tests send is refused before any
connection.
"""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import own_database
from sqlalchemy import text

from tests.integration.harness import Deployment, base_env, require_service, running_deployment
from tests.reliability import summary

ALLOWED_BUCKET = "enrich-allowed-images"


class CountingListener:
    """A loopback TCP listener that accepts, counts and closes: the witness that no connection
    was ever made to an address the policy refuses."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port: int = self._sock.getsockname()[1]
        self.connections = 0
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._closed = True
        self._sock.close()


@pytest.fixture(scope="session")
def s3_witness() -> Iterator[CountingListener]:
    """The deployment's S3 endpoint: every S3 reference the tests send must be refused before it."""
    listener = CountingListener()
    yield listener
    listener.close()


@pytest.fixture(scope="session")
def rabbitmq() -> None:
    require_service(5672, "RabbitMQ", "start it (rabbitmq-server -detached) or run infra/scripts/services.sh")


@pytest.fixture(scope="session")
def secure_deployment(rabbitmq, pg_url: str, engine, tmp_path_factory: pytest.TempPathFactory,  # noqa: ANN001
                      dataset_dir: Path, s3_witness: CountingListener) -> Iterator[Deployment]:
    data_dir: Path = tmp_path_factory.mktemp("secure-deploy")
    namespace = f"s{uuid.uuid4().hex[:10]}"
    env = base_env(pg_url=pg_url, data_dir=data_dir, namespace=namespace,
                   ENRICH_DB__RUNTIME_ROLE="enrich_worker",
                   ENRICH_MODELS__UNKNOWN_CATEGORY="reject",
                   ENRICH_STORAGE__FILE_ROOTS=json.dumps([str(dataset_dir), str(data_dir / "hostile")]),
                   ENRICH_STORAGE__ALLOWED_BUCKETS=json.dumps([ALLOWED_BUCKET]),
                   # A counting listener: nothing may get this far.
                   ENRICH_STORAGE__S3_ENDPOINT_URL=f"http://127.0.0.1:{s3_witness.port}")
    (data_dir / "hostile").mkdir()
    with running_deployment(env=env, data_dir=data_dir, namespace=namespace, engine=engine) as dep:
        yield dep


@pytest.fixture
def hostile_dir(secure_deployment: Deployment) -> Path:
    """Where a test writes hostile image files (an allowed file root of the deployment)."""
    return secure_deployment.data_dir / "hostile"


def tenant(prefix: str = "sec") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def failed_messages(dep: Deployment, tenant_id: str | None = None) -> dict[str, dict[str, Any]]:
    """listing.failed messages drained from the backend's queue, by causation id."""
    return {m["causation_id"]: m for m in dep.drain_listing_events()
            if m["event_type"] == "listing.failed" and (tenant_id is None or m.get("tenant_id") == tenant_id)}


def wait_messages(dep: Deployment, causation_ids: Iterable[str], *, timeout: float = 60) -> dict[str, dict[str, Any]]:
    """Drain listing.* until a message for every causation id arrived (the outbox relays after commit)."""
    import time

    wanted = set(causation_ids)
    seen: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for m in dep.drain_listing_events():
            seen.setdefault(m["causation_id"], m)
        if wanted <= seen.keys():
            return seen
        time.sleep(0.5)
    raise AssertionError(f"no listing.* message for {sorted(wanted - seen.keys())} in {timeout}s\n" + dep.logs())


def job_outcomes(dep: Deployment, event_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, Any]:
    rows = dep.wait_finished(event_ids, timeout=180)
    return rows


def record_burst(scenario: str, rows: dict[uuid.UUID, Any], *, published: int, rejected: int = 0,
                 refused_connections: int | None = None, note: str = "") -> None:
    done = sum(1 for r in rows.values() if r.status == "done")
    codes = Counter(r.error_code for r in rows.values() if r.status == "failed")
    lost = published - len(rows) - rejected
    summary.record(scenario, published=published, done=done, failed_by_code=codes, rejected=rejected,
                   lost=lost, duplicated=0, refused_connections=refused_connections, note=note)


def listing_counts(dep: Deployment, tenant_id: str) -> int:
    with dep.engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM listings WHERE tenant_id = :t"), {"t": tenant_id}).scalar_one()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:  # noqa: ARG001
    """Print the shared table when the reliability package's own hook is not loaded in this run."""
    plugins = config.pluginmanager.get_plugins()
    if any(str(getattr(p, "__file__", "")).endswith("tests/reliability/conftest.py") for p in plugins):
        return
    table = summary.render()
    if table:
        terminalreporter.section("reliability summary (hostile inputs)")
        terminalreporter.write_line(table)
        bad = summary.violations()
        terminalreporter.write_line("must-be-zero columns: " + ("all zero" if not bad else "VIOLATED: " + "; ".join(bad)))


# Worker processes commit real rows: this suite gets a database of its own.
pg_url, engine = own_database("security")
