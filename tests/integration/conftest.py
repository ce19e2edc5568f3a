from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import own_database
from tests.integration.harness import Deployment, base_env, require_service, running_deployment


@pytest.fixture(scope="session")
def rabbitmq() -> None:
    require_service(5672, "RabbitMQ", "start it (rabbitmq-server -detached) or run infra/scripts/services.sh")


@pytest.fixture(scope="module")
def deployment(rabbitmq, pg_url: str, engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:  # noqa: ANN001
    """events+cpu worker and gpu worker on RabbitMQ, tiny models, unknown categories rejected."""
    data_dir: Path = tmp_path_factory.mktemp("deploy")
    namespace = f"t{uuid.uuid4().hex[:10]}"
    env = base_env(pg_url=pg_url, data_dir=data_dir, namespace=namespace,
                   ENRICH_MODELS__UNKNOWN_CATEGORY="reject")
    with running_deployment(env=env, data_dir=data_dir, namespace=namespace, engine=engine) as dep:
        yield dep


def tenant() -> str:
    return f"tenant-{uuid.uuid4().hex[:8]}"


# Worker processes commit real rows: this suite gets a database of its own.
pg_url, engine = own_database("integration")
