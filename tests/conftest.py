"""Shared fixtures: a real PostgreSQL+pgvector (embedded, fresh per test session) built by Alembic,
each test in a rolled-back transaction; the real clothing photos; isolated settings."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Before anything imports transformers/huggingface_hub: a missing model fails at once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
DATASET_DIR = REPO_ROOT.parent / "shared" / "datasets" / "clothing-small"


@pytest.fixture(scope="session")
def dataset_dir() -> Path:
    if not (DATASET_DIR / "manifest.csv").exists():
        pytest.fail(f"real photo dataset missing at {DATASET_DIR} (expected ../shared beside the repo)")
    return DATASET_DIR


@pytest.fixture(scope="session")
def manifest(dataset_dir: Path) -> list[dict[str, str]]:
    with open(dataset_dir / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="session")
def sample_photos(dataset_dir: Path, manifest: list[dict[str, str]]) -> list[tuple[Path, str]]:
    """Two real photos per category (path, category), deterministic."""
    seen: dict[str, int] = {}
    out: list[tuple[Path, str]] = []
    for row in manifest:
        if row["split"] != "validation" or seen.get(row["category"], 0) >= 2:
            continue
        seen[row["category"]] = seen.get(row["category"], 0) + 1
        out.append((dataset_dir / row["path"], row["category"]))
    return out


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core box: extra intra-op threads only add contention (measured
    60x slower under load), so model tests run with one thread and restore the setting after."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def generator(one_torch_thread: None):  # noqa: ANN201
    """The tiny-profile listing generator (random weights), loaded once per module."""
    from models.listing import ListingGenerator

    gen = ListingGenerator(profile="tiny", device="cpu", max_new_tokens=48, seed=0)
    gen.load()
    return gen


@pytest.fixture(scope="session")
def pg_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh embedded PostgreSQL 18 + pgvector for this test session, migrated to head."""
    from db import migrate
    from db.embedded import start_embedded
    from db.engine import make_engine

    url = start_embedded(tmp_path_factory.mktemp("pg") / "pgdata")
    engine = make_engine(url)
    migrate.upgrade(engine)
    engine.dispose()
    return url


@pytest.fixture(scope="session")
def engine(pg_url: str):  # noqa: ANN201
    from db.engine import make_engine

    eng = make_engine(pg_url, pool_size=5)
    yield eng
    eng.dispose()


@pytest.fixture
def db_session(engine) -> Iterator:  # noqa: ANN001
    """A Session whose every commit is rolled back at the end of the test."""
    from sqlalchemy.orm import Session

    conn = engine.connect()
    outer = conn.begin()
    session = Session(bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False)
    try:
        yield session
    finally:
        session.close()
        outer.rollback()
        conn.close()


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Isolated ENRICH_DATA_DIR; settings cache reset around the test."""
    from workers.settings import reset_settings_cache

    monkeypatch.setenv("ENRICH_DATA_DIR", str(tmp_path / "data"))
    reset_settings_cache()
    yield tmp_path / "data"
    reset_settings_cache()


def fresh_database(server_url: str, name: str) -> str:
    """A new, migrated database on the session's server: suites whose worker processes commit
    real rows (integration, reliability, security) get their own, so unit tests that expect an
    empty catalog never see those rows, whatever the order tests run in."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from db import migrate
    from db.engine import make_engine

    admin = make_engine(server_url)
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    eng = make_engine(url)
    migrate.upgrade(eng)
    eng.dispose()
    return url


def own_database(suite: str):  # noqa: ANN201
    """``pg_url`` and ``engine`` overrides for a suite's conftest: ``pg_url, engine = own_database("x")``."""

    @pytest.fixture(scope="session", name="pg_url")
    def suite_pg_url(pg_url: str) -> str:
        return fresh_database(pg_url, f"suite_{suite}")

    @pytest.fixture(scope="session", name="engine")
    def suite_engine(pg_url: str):  # noqa: ANN202
        from db.engine import make_engine

        eng = make_engine(pg_url, pool_size=5)
        yield eng
        eng.dispose()

    return suite_pg_url, suite_engine
