from __future__ import annotations

from sqlalchemy import inspect, text

from db import migrate
from db.tables import TENANT_SCOPED_TABLES


def test_upgrade_downgrade_upgrade_on_a_real_database(scratch_engine) -> None:  # noqa: ANN001
    eng = scratch_engine("migration_cycle")
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


def test_0007_downgrade_removes_what_it_created(scratch_engine) -> None:  # noqa: ANN001
    """The maintenance role's policies and grants go; the role itself stays while another database
    of the cluster (the session's own) still grants it something."""
    eng = scratch_engine("migration_0007")

    def state() -> tuple[int, bool, bool]:
        with eng.connect() as conn:
            policies = conn.execute(text("SELECT count(*) FROM pg_policies WHERE policyname = 'admin_system_scope'"))
            granted = conn.execute(text("SELECT has_table_privilege('enrich_admin', 'public.listings', 'SELECT')"))
            defaults = conn.execute(text("SELECT EXISTS (SELECT 1 FROM pg_default_acl d, aclexplode(d.defaclacl) a "
                                         "WHERE a.grantee = 'enrich_admin'::regrole)"))
            return policies.scalar_one(), granted.scalar_one(), defaults.scalar_one()

    migrate.upgrade(eng)
    assert state() == (len(TENANT_SCOPED_TABLES), True, True)
    migrate.downgrade(eng, "0006")
    assert state() == (0, False, False)
    migrate.upgrade(eng)
    assert state() == (len(TENANT_SCOPED_TABLES), True, True)
