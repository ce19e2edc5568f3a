"""The maintenance role ``enrich_admin`` (migration 0007) under forced row-level security.

The maintenance commands read and write every tenant; the table owner cannot (RLS is forced, and
the owner has no policy), so they ``SET ROLE enrich_admin`` and run each transaction in the system
scope. Here: the role and its policies, what it sees in which scope, when a role counts as seeing
every tenant, and ``enrich status`` / ``enrich embeddings …`` run as a non-superuser login that
owns the tables, against rows another tenant committed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from db import migrate
from db.engine import make_engine, sees_every_tenant, set_system_scope, set_tenant
from db.tables import TENANT_SCOPED_TABLES
from tests.conftest import ADMIN_ROLE, REPO_ROOT, as_role, fresh_database, login_role
from tests.db.catalog_rows import add_embeddings, add_listings, add_model_version, add_products, add_tenant, unit_rows
from tests.security.test_tenant_isolation import tenant_tables_added_later

READER, WORKER = "enrich_reader", "enrich_worker"


def _count(session: Session, table: str) -> int:
    return session.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()


def _seed(session: Session, tenant: str, n: int = 3) -> None:
    add_tenant(session, tenant)
    vlm = add_model_version(session, "vlm", f"vlm-{tenant}")
    clip = add_model_version(session, "clip", f"clip-{tenant}", dims=8)
    pids = add_products(session, tenant, [f"p{i}" for i in range(n)], ["dress"] * n)
    lids = add_listings(session, tenant, pids, ["dress"] * n, vlm_id=vlm)
    add_embeddings(session, tenant, pids, lids, ["dress"] * n, unit_rows(np.random.default_rng(3), n, 8), clip_id=clip)


def test_admin_role_and_its_policies(db_session) -> None:  # noqa: ANN001
    role = db_session.execute(text("SELECT rolcanlogin, rolsuper, rolbypassrls, rolinherit FROM pg_roles "
                                   "WHERE rolname = :r"), {"r": ADMIN_ROLE}).one()
    assert not (role.rolcanlogin or role.rolsuper or role.rolbypassrls)
    owners = set(db_session.execute(text("SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class c "
                                         "JOIN pg_namespace n ON n.oid = c.relnamespace "
                                         "WHERE n.nspname IN ('public', 'catalog', 'catalog_impl')")).scalars())
    assert ADMIN_ROLE not in owners
    policies = db_session.execute(text(
        "SELECT tablename, roles, qual, with_check FROM pg_policies "
        "WHERE schemaname = 'public' AND policyname = 'admin_system_scope'")).all()
    assert {p.tablename for p in policies} == set(TENANT_SCOPED_TABLES)
    for p in policies:
        assert list(p.roles) == [ADMIN_ROLE]
        assert "enrich.scope" in p.qual and "'system'" in p.qual and p.with_check == p.qual
    # No write access to the migration bookkeeping; DML on the rest.
    can = db_session.execute(text(
        "SELECT has_table_privilege(:r, 'public.alembic_version', 'INSERT'), "
        "has_table_privilege(:r, 'public.embeddings', 'INSERT, UPDATE, DELETE'), "
        "has_table_privilege(:r, 'public.model_versions', 'UPDATE'), "
        "has_function_privilege(:r, 'catalog.similar_products(text, text, integer, boolean)', 'EXECUTE')"),
        {"r": ADMIN_ROLE}).one()
    assert tuple(can) == (False, True, True, True)
    # 0007 froze its own copy of the tenant-scoped table list.
    spec = importlib.util.spec_from_file_location("m0007", migrate.MIGRATIONS_DIR / "versions" / "0007_admin_role.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert set(module.TENANT_SCOPED) | tenant_tables_added_later() == set(TENANT_SCOPED_TABLES)


def test_admin_sees_every_tenant_only_in_the_system_scope(db_session) -> None:  # noqa: ANN001
    suffix = uuid.uuid4().hex[:8]
    a, b = f"adm-a-{suffix}", f"adm-b-{suffix}"
    for t in (a, b):
        _seed(db_session, t)
    total = _count(db_session, "listings")
    with as_role(db_session, ADMIN_ROLE):
        assert _count(db_session, "listings") == 0 and not sees_every_tenant(db_session)
        set_tenant(db_session, a)
        assert set(db_session.execute(text("SELECT DISTINCT tenant_id FROM listings")).scalars()) == {a}
        set_system_scope(db_session)
        assert _count(db_session, "listings") == total and sees_every_tenant(db_session)
        # Writes in the system scope keep their tenant (WITH CHECK passes for any tenant id).
        db_session.execute(text("UPDATE products SET title = 'by admin' WHERE tenant_id = :b"), {"b": b})
        assert db_session.execute(text("SELECT count(*) FROM products WHERE title = 'by admin'")).scalar_one() == 3


def test_who_sees_every_tenant(db_session) -> None:  # noqa: ANN001
    """The check that maintenance transactions make instead of trusting an empty count."""
    _seed(db_session, f"who-{uuid.uuid4().hex[:8]}")
    inherits, sets_only, owner = (f"test_{kind}_{uuid.uuid4().hex[:6]}" for kind in ("inherit", "set", "owner"))
    for role in (inherits, sets_only, owner):
        db_session.execute(text(f'CREATE ROLE "{role}" NOLOGIN'))
    db_session.execute(text(f'GRANT {ADMIN_ROLE} TO "{inherits}"'))
    db_session.execute(text(f'GRANT {ADMIN_ROLE} TO "{sets_only}" WITH INHERIT FALSE'))
    db_session.execute(text(f'ALTER TABLE public.listings OWNER TO "{owner}"'))
    db_session.execute(text(f'GRANT SELECT ON public.listings TO "{inherits}", "{sets_only}"'))
    set_system_scope(db_session)
    assert sees_every_tenant(db_session)  # the superuser
    expected = {ADMIN_ROLE: True, WORKER: True, READER: False, owner: False,
                # Policies apply to members that inherit the role; without INHERIT only SET ROLE helps.
                inherits: True, sets_only: False}
    for role, sees in expected.items():
        with as_role(db_session, role):
            assert sees_every_tenant(db_session) is sees, role
            assert (_count(db_session, "listings") > 0) is sees, role


# ---------------------------------------------------------------- the CLI, as an operator runs it

@dataclass
class MaintenanceDb:
    url: str  # the superuser's
    owner_url: str  # a non-superuser login that owns every table and may SET ROLE enrich_admin (no INHERIT)
    tenant: str
    clip_id: int
    empty_clip_id: int


@pytest.fixture(scope="module")
def maintenance_db(pg_url: str) -> Iterator[MaintenanceDb]:
    """A database of its own (rows are committed) whose tables a non-superuser login owns, as in
    production; tenant rows committed by the superuser, as another tenant's pipeline would."""
    url = fresh_database(pg_url, "maintenance_cli")
    tenant = f"cli-b-{uuid.uuid4().hex[:6]}"
    engine = make_engine(url, pool_size=1)
    try:
        with Session(engine) as s, s.begin():
            add_tenant(s, tenant)
            vlm = add_model_version(s, "vlm", "cli-vlm")
            clip = add_model_version(s, "clip", "cli-clip", dims=512)
            empty = add_model_version(s, "clip", "cli-empty", dims=512, status="candidate")
            pids = add_products(s, tenant, ["x", "y", "z"], ["dress"] * 3)
            lids = add_listings(s, tenant, pids, ["dress"] * 3, vlm_id=vlm)
            add_embeddings(s, tenant, pids, lids, ["dress"] * 3, unit_rows(np.random.default_rng(1), 3, 512),
                           clip_id=clip)
            for pid, status in zip(pids, ("done", "done", "failed"), strict=True):
                event = uuid.uuid4()
                s.execute(text("INSERT INTO inbox_events (event_id, tenant_id, event_type, status) "
                               "VALUES (:e, :t, 'product.created', 'accepted')"), {"e": event, "t": tenant})
                s.execute(text("INSERT INTO enrichment_jobs (tenant_id, event_id, product_id, product_version, "
                               "status, error_code, finished_at) VALUES (:t, :e, :p, 1, :s, :code, now())"),
                          {"t": tenant, "e": event, "p": pid, "s": status,
                           "code": "fetch_timeout" if status == "failed" else None})
        with login_role(url, member_of=(ADMIN_ROLE,), inherit=False, owns_schema=True) as owner_url:
            yield MaintenanceDb(url, owner_url, tenant, clip, empty)
    finally:
        engine.dispose()
        admin = make_engine(pg_url, pool_size=1)
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text('DROP DATABASE IF EXISTS "maintenance_cli" WITH (FORCE)'))
        admin.dispose()


def enrich(db_url: str, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("ENRICH_")}
    full.update({"ENRICH_DB__URL": db_url, "ENRICH_DATA_DIR": str(tmp_path), "ENRICH_MODELS__PROFILE": "tiny",
                 "PYTHONPATH": str(REPO_ROOT), **env})
    return subprocess.run([sys.executable, "-m", "workers", *args], cwd=REPO_ROOT, env=full,
                          capture_output=True, text=True, timeout=120)


def test_status_as_the_admin_role_counts_another_tenants_rows(maintenance_db: MaintenanceDb, tmp_path: Path) -> None:
    res = enrich(maintenance_db.owner_url, tmp_path, "status", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["jobs_by_status"] == {"done": 2, "failed": 1}
    assert report["failures_by_code"] == {"fetch_timeout": 1}
    assert report["intake"] == {"accepted": 3}
    assert report["coverage"]["products"] == 3


def test_embeddings_list_as_the_admin_role_counts_every_row(maintenance_db: MaintenanceDb, tmp_path: Path) -> None:
    res = enrich(maintenance_db.owner_url, tmp_path, "embeddings", "list")
    assert res.returncode == 0, res.stderr
    lines = {line.split()[0]: line for line in res.stdout.splitlines() if line.strip()}
    assert "3 rows  cli-clip@r1" in lines[str(maintenance_db.clip_id)]
    assert "0 rows  cli-empty@r1" in lines[str(maintenance_db.empty_clip_id)]


def test_activate_refuses_an_empty_version_even_with_force(maintenance_db: MaintenanceDb, tmp_path: Path) -> None:
    res = enrich(maintenance_db.owner_url, tmp_path, "embeddings", "activate", str(maintenance_db.empty_clip_id),
                 "--force")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "covers none of the 3 listings" in res.stderr and "--force does not skip" in res.stderr


def test_without_the_admin_role_the_owner_is_refused_not_shown_zeros(maintenance_db: MaintenanceDb,
                                                                     tmp_path: Path) -> None:
    """``ENRICH_DB__ADMIN_ROLE=''``: the owning login stays itself, which the forced policies filter
    to nothing; the command says so in one line instead of reporting an empty catalog."""
    res = enrich(maintenance_db.owner_url, tmp_path, "status", "--json", ENRICH_DB__ADMIN_ROLE="")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "cannot see every tenant" in res.stderr and "GRANT enrich_admin TO test_login_" in res.stderr


def test_build_pairs_runs_as_the_admin_role(maintenance_db: MaintenanceDb, tmp_path: Path) -> None:
    res = enrich(maintenance_db.owner_url, tmp_path, "retrain", "build-pairs")
    assert res.returncode == 0, res.stderr
    assert "no dataset written" in res.stdout or "pairs at" in res.stdout
