from __future__ import annotations

from sqlalchemy import inspect, text

from db import migrate
from db.engine import make_engine
from db.tables import TENANT_SCOPED_TABLES


def test_upgrade_downgrade_upgrade_on_a_real_database(engine) -> None:  # noqa: ANN001
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("DROP DATABASE IF EXISTS migration_cycle"))
        conn.execute(text("CREATE DATABASE migration_cycle"))
    url = engine.url.set(database="migration_cycle")
    eng = make_engine(url.render_as_string(hide_password=False))
    try:
        migrate.upgrade(eng)
        assert migrate.current_revision(eng) == migrate.head_revision()
        assert "listings" in inspect(eng).get_table_names()
        migrate.downgrade(eng, "base")
        assert migrate.current_revision(eng) is None
        assert set(inspect(eng).get_table_names()) <= {"alembic_version"}
        with eng.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM pg_extension WHERE extname='vector'")).scalar() == 0
        migrate.upgrade(eng)
        assert migrate.current_revision(eng) == migrate.head_revision()
    finally:
        eng.dispose()
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("DROP DATABASE IF EXISTS migration_cycle WITH (FORCE)"))


def test_0007_downgrade_removes_what_it_created(engine) -> None:  # noqa: ANN001
    """The maintenance role's policies and grants go; the role itself stays while another database
    of the cluster (the session's own) still grants it something."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("DROP DATABASE IF EXISTS migration_0007"))
        conn.execute(text("CREATE DATABASE migration_0007"))
    eng = make_engine(engine.url.set(database="migration_0007").render_as_string(hide_password=False))

    def state() -> tuple[int, bool, bool]:
        with eng.connect() as conn:
            policies = conn.execute(text("SELECT count(*) FROM pg_policies WHERE policyname = 'admin_system_scope'"))
            granted = conn.execute(text("SELECT has_table_privilege('enrich_admin', 'public.listings', 'SELECT')"))
            defaults = conn.execute(text("SELECT EXISTS (SELECT 1 FROM pg_default_acl d, aclexplode(d.defaclacl) a "
                                         "WHERE a.grantee = 'enrich_admin'::regrole)"))
            return policies.scalar_one(), granted.scalar_one(), defaults.scalar_one()

    try:
        migrate.upgrade(eng)
        assert state() == (len(TENANT_SCOPED_TABLES), True, True)
        migrate.downgrade(eng, "0006")
        assert state() == (0, False, False)
        migrate.upgrade(eng)
        assert state() == (len(TENANT_SCOPED_TABLES), True, True)
    finally:
        eng.dispose()
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("DROP DATABASE IF EXISTS migration_0007 WITH (FORCE)"))
