from __future__ import annotations

from sqlalchemy import inspect, text

from db import migrate
from db.engine import make_engine


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
