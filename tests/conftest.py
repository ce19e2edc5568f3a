"""Shared fixtures: a real PostgreSQL+pgvector (embedded, fresh per test session) built by Alembic,
each test in a rolled-back transaction; the real clothing photos; isolated settings; sessions and
logins as the production roles (``enrich_admin`` for maintenance, ``enrich_worker`` for the
pipeline), which forced row-level security applies to (the test connection is a superuser and
bypasses it)."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from contextlib import contextmanager
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


# ---------------------------------------------------------------- the production roles

ADMIN_ROLE, WORKER_ROLE, READER_ROLE = "enrich_admin", "enrich_worker", "enrich_reader"


@contextmanager
def as_role(session, role: str | None) -> Iterator[None]:  # noqa: ANN001
    """``SET ROLE role`` for the block (``None``: the connecting superuser, e.g. to seed rows or
    run index DDL, which needs the table owner), then back to the role the session had."""
    from sqlalchemy import text

    previous = session.execute(text("SELECT current_setting('role')")).scalar_one()
    session.execute(text(f'SET ROLE "{role}"') if role else text("RESET ROLE"))
    try:
        yield
    finally:
        session.execute(text("RESET ROLE") if previous == "none" else text(f'SET ROLE "{previous}"'))


def _set_scope(session, tenant_id: str, scope: str) -> None:  # noqa: ANN001
    from sqlalchemy import text

    session.execute(text("SELECT set_config('enrich.tenant_id', :t, true), "
                         "set_config('enrich.scope', :s, true)"), {"t": tenant_id, "s": scope})


@contextmanager
def in_scope(session, role: str, *, tenant: str | None = None,  # noqa: ANN001
             system: bool = False) -> Iterator[None]:
    """The block as a production transaction of ``role`` under forced row-level security: SET
    ROLE, then only the scope named here (``tenant``, as ``db.engine.tenant_session`` and
    ``job_session`` set it; ``system``, as ``system_session`` and ``admin_session`` do; neither:
    what the code under test sets itself, as ``reconcile`` and ``build_preference_pairs`` do).
    Whatever scope the block ends with is dropped, as the end of its transaction would drop it,
    and the session is back to its role (seeding as the superuser goes on as before)."""
    with as_role(session, role):
        _set_scope(session, tenant or "", "system" if system else "")
        try:
            yield
        finally:
            _set_scope(session, "", "")


def in_tenant(session, tenant_id: str, role: str = WORKER_ROLE):  # noqa: ANN001, ANN201
    """``in_scope`` of one tenant: how the pipeline's stages and the review intake run."""
    return in_scope(session, role, tenant=tenant_id)


def in_system_scope(session, role: str = WORKER_ROLE):  # noqa: ANN001, ANN201
    """``in_scope`` of the system scope: beat's cross-tenant work as ``enrich_worker``, the
    maintenance commands' as ``enrich_admin``."""
    return in_scope(session, role, system=True)


@pytest.fixture
def admin_db_session(db_session) -> Iterator:  # noqa: ANN001
    """``db_session`` as the maintenance role ``enrich_admin`` (``SET ROLE`` in the test
    transaction): subject to forced row-level security like the maintenance commands, so it sees
    every tenant only in the system scope (``db.engine.admin_session``). Seed rows as the
    superuser first (``with as_role(db_session, None):``)."""
    with as_role(db_session, ADMIN_ROLE):
        yield db_session


@pytest.fixture(scope="session")
def admin_engine(pg_url: str):  # noqa: ANN201
    """Connections that ``SET ROLE enrich_admin``, as the maintenance commands' engine does
    (``workers.database.get_admin_session_factory``)."""
    from db.engine import make_engine

    eng = make_engine(pg_url, pool_size=2, runtime_role=ADMIN_ROLE)
    yield eng
    eng.dispose()


@pytest.fixture(scope="session")
def worker_engine(pg_url: str):  # noqa: ANN201
    """Connections that ``SET ROLE enrich_worker``, as the workers' engine does with
    ``ENRICH_DB__RUNTIME_ROLE=enrich_worker`` (``workers.database.get_engine``)."""
    from db.engine import make_engine

    eng = make_engine(pg_url, pool_size=2, runtime_role=WORKER_ROLE)
    yield eng
    eng.dispose()


@pytest.fixture
def worker_db_session(db_session) -> Iterator:  # noqa: ANN001
    """``db_session`` as the runtime role ``enrich_worker``, as the pipeline's workers run."""
    with as_role(db_session, WORKER_ROLE):
        yield db_session


_MIGRATED_OBJECTS_SQL = """
    SELECT 'SCHEMA', quote_ident(nspname) FROM pg_namespace WHERE nspname IN ('catalog', 'catalog_impl')
    UNION ALL
    SELECT CASE c.relkind WHEN 'c' THEN 'TYPE' ELSE 'TABLE' END, c.oid::regclass::text
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname IN ('public', 'catalog', 'catalog_impl') AND c.relkind IN ('r', 'v', 'c')
    UNION ALL
    SELECT 'FUNCTION', p.oid::regprocedure::text
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname IN ('catalog', 'catalog_impl')
"""


@contextmanager
def login_role(server_url: str, *, member_of: tuple[str, ...] = (), inherit: bool = True,
               owns_schema: bool = False) -> Iterator[str]:
    """A throwaway non-superuser LOGIN role (the embedded server trusts local logins): a member of
    ``member_of`` (``inherit=False``: may only ``SET ROLE`` to them); with ``owns_schema``
    the owner of what the migrations created in the URL's database (tables, the ``catalog``
    schemas, views and functions), like a production migrating login that is not a superuser.
    Yields its URL; dropped after."""
    import uuid

    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from db.engine import make_engine

    name = f"test_login_{uuid.uuid4().hex[:8]}"
    _MIGRATED_OBJECTS = text(_MIGRATED_OBJECTS_SQL)
    admin = make_engine(server_url, pool_size=1)
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE ROLE "{name}" LOGIN'))
            for role in member_of:
                conn.execute(text(f'GRANT "{role}" TO "{name}"' + ("" if inherit else " WITH INHERIT FALSE")))
            if owns_schema:
                for kind, obj in conn.execute(_MIGRATED_OBJECTS).all():
                    conn.execute(text(f'ALTER {kind} {obj} OWNER TO "{name}"'))
        yield make_url(server_url).set(username=name).render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            if owns_schema:
                conn.execute(text(f'REASSIGN OWNED BY "{name}" TO current_user'))
            conn.execute(text(f'DROP OWNED BY "{name}"'))
            conn.execute(text(f'DROP ROLE "{name}"'))
        admin.dispose()
