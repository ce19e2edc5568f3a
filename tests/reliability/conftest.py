"""Fixtures of the reliability suite: one fresh deployment (namespace, queues, workers) per
scenario, torn down (workers stopped, queues and exchanges deleted) whatever happens; and the
session summary table."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tasks.events import product_event_payload
from tests.conftest import own_database
from tests.integration.harness import base_env, require_service
from tests.reliability import summary
from tests.reliability.harness import FaultDeployment

DeploymentFactory = Callable[..., FaultDeployment]

# Worker processes commit real rows: this suite gets a database of its own.
pg_url, engine = own_database("reliability")


@pytest.fixture(scope="session")
def rabbitmq() -> None:
    require_service(5672, "RabbitMQ", "start it (rabbitmq-server -detached) or run infra/scripts/services.sh")


@pytest.fixture
def make_deployment(rabbitmq, pg_url: str, engine, tmp_path: Path) -> Iterator[DeploymentFactory]:  # noqa: ANN001
    """``make_deployment(**ENRICH_overrides)`` → a FaultDeployment with its own namespace; no
    workers yet (each scenario starts its own, with its own faults)."""
    made: list[FaultDeployment] = []

    def make(max_restarts: int = 3, **overrides: str) -> FaultDeployment:
        namespace = f"f{uuid.uuid4().hex[:10]}"
        data_dir = tmp_path / f"dep{len(made)}"
        data_dir.mkdir()
        env = base_env(pg_url=pg_url, data_dir=data_dir, namespace=namespace, **overrides)
        dep = FaultDeployment(env=env, data_dir=data_dir, namespace=namespace, engine=engine, max_restarts=max_restarts)
        made.append(dep)
        return dep

    yield make
    for dep in made:
        try:
            dep.stop_workers(timeout=20)
        finally:
            dep.delete_broker_objects()


@pytest.fixture
def new_tenant() -> Callable[[], str]:
    return lambda: f"rel-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def product_event(sample_photos) -> Callable[..., dict[str, Any]]:  # noqa: ANN001
    """``product_event(tenant, external_id, n)`` → a valid product event on the n-th real photo."""

    def make(tenant: str, external_id: str, n: int = 0, *, image_url: str | None = None, version: int = 1,
             title: str | None = None) -> dict[str, Any]:
        path, category = sample_photos[n % len(sample_photos)]
        return product_event_payload(tenant_id=tenant, merchant_id="m1", external_id=external_id, version=version,
                                     category=category, image_urls=[image_url or path.as_uri()],
                                     title=title or f"{category} {external_id}", description="Photographed on a hanger.",
                                     attributes={"brand": "Acme"})

    return make


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:  # noqa: ARG001
    table = summary.render()
    if not table:
        return
    terminalreporter.section("reliability summary")
    terminalreporter.write_line(table)
    bad = summary.violations()
    terminalreporter.write_line("must-be-zero columns: " + ("all zero" if not bad else "VIOLATED: " + "; ".join(bad)))
