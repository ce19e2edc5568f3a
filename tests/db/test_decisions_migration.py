"""Migration 0009 (duplicate decisions, trimmed hashes) goes up and down cleanly with rows in place:
its table secured like every tenant-scoped table, the views extended and restored, a merchant-
confirmed member kept (as ``near``) by the downgrade even when the owner that runs it is no
superuser (forced RLS hides every member row from it)."""

from __future__ import annotations

import uuid

from sqlalchemy import inspect, text

from db import migrate
from db.engine import make_engine
from tests.conftest import login_role

GRANTS = ("SELECT has_table_privilege('enrich_worker', 'public.duplicate_decisions', 'INSERT, UPDATE, DELETE'),"
          " has_table_privilege('enrich_admin', 'public.duplicate_decisions', 'INSERT, UPDATE, DELETE'),"
          " has_table_privilege('enrich_reader', 'public.duplicate_decisions', 'SELECT'),"
          " has_table_privilege('enrich_reader', 'catalog.duplicate_decisions', 'SELECT'),"
          " has_table_privilege('enrich_reader', 'catalog.duplicate_groups', 'SELECT')")


def _seed_confirmed_group(eng) -> None:  # noqa: ANN001
    """Two images of one tenant grouped because a merchant confirmed it (as the superuser: seeding)."""
    with eng.begin() as conn:
        conn.execute(text("INSERT INTO tenants (id) VALUES ('mig')"))
        ids = [conn.execute(text(
            "INSERT INTO images (tenant_id, sha256, phash, dhash, width, height, byte_size, format, storage_uri)"
            " VALUES ('mig', :s, CAST(repeat('0', 64) AS bit(64)), CAST(repeat('1', 64) AS bit(64)), 1, 1, 1,"
            " 'JPEG', 'file:///x') RETURNING id"), {"s": sha * 64}).scalar_one() for sha in "ab"]
        group = conn.execute(text("INSERT INTO duplicate_groups (tenant_id, representative_image_id)"
                                  " VALUES ('mig', :i) RETURNING id"), {"i": ids[0]}).scalar_one()
        for image_id in ids:
            conn.execute(text("INSERT INTO duplicate_members (group_id, image_id, tenant_id, method)"
                              " VALUES (:g, :i, 'mig', 'confirmed')"), {"g": group, "i": image_id})
        conn.execute(text("INSERT INTO duplicate_decisions (tenant_id, image_a_sha256, image_b_sha256, decision,"
                          " event_id, occurred_at, merchant_id, reviewer) VALUES ('mig', :a, :b, 'confirmed', :e,"
                          " now(), 'm', 'ui')"), {"a": "a" * 64, "b": "b" * 64, "e": uuid.uuid4()})


def test_0009_up_down_up_with_a_confirmed_group(engine, pg_url: str) -> None:  # noqa: ANN001
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("DROP DATABASE IF EXISTS migration_decisions"))
        conn.execute(text("CREATE DATABASE migration_decisions"))
    url = engine.url.set(database="migration_decisions").render_as_string(hide_password=False)
    eng = make_engine(url)
    try:
        migrate.upgrade(eng, "0009")
        with eng.connect() as conn:
            policies = set(conn.execute(text("SELECT policyname FROM pg_policies"
                                             " WHERE tablename = 'duplicate_decisions'")).scalars())
            secured = conn.execute(text("SELECT relrowsecurity AND relforcerowsecurity FROM pg_class"
                                        " WHERE relname = 'duplicate_decisions' AND relkind = 'r'")).scalar_one()
            assert tuple(conn.execute(text(GRANTS)).one()) == (True, True, True, True, True)
        assert policies == {"tenant_isolation", "system_scope", "admin_system_scope"} and secured
        assert {"phash_trimmed", "dhash_trimmed", "phash_centre", "dhash_centre"} <= {
            c["name"] for c in inspect(eng).get_columns("images")}
        _seed_confirmed_group(eng)

        # The downgrade as a production migrating login: owns everything, is no superuser.
        with login_role(url, owns_schema=True) as owner_url:
            owner = make_engine(owner_url)
            try:
                migrate.downgrade(owner, "0008")
            finally:
                owner.dispose()
        with eng.connect() as conn:
            methods = conn.execute(text("SELECT method FROM duplicate_members WHERE tenant_id = 'mig'")).scalars()
            columns = [c["name"] for c in inspect(eng).get_columns("duplicate_groups", schema="catalog")]
            assert sorted(methods) == ["near", "near"]
            assert "decisions" not in columns and "members" in columns
            assert conn.execute(text("SELECT has_table_privilege('enrich_reader', 'catalog.duplicate_groups',"
                                     " 'SELECT')")).scalar_one()
        assert "duplicate_decisions" not in inspect(eng).get_table_names()
        assert not {"phash_trimmed", "dhash_trimmed", "phash_centre", "dhash_centre"} & {
            c["name"] for c in inspect(eng).get_columns("images")}

        migrate.upgrade(eng)
        assert migrate.current_revision(eng) == migrate.head_revision()
    finally:
        eng.dispose()
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("DROP DATABASE IF EXISTS migration_decisions WITH (FORCE)"))
