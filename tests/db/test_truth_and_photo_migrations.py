"""Migrations 0008 (listing truth flags) and 0011 (every photo's embedding) go up and down cleanly,
and 0011's table is secured like every tenant-scoped table (forced RLS, the three policies)."""

from __future__ import annotations

from sqlalchemy import inspect, text

from db import migrate

FLAGS = {"forced_fields", "forced_tokens", "conflicts", "text_checks"}


def test_0008_and_0011_up_down_up(scratch_engine) -> None:  # noqa: ANN001
    eng = scratch_engine("migration_truth")

    def state() -> dict[str, object]:
        insp = inspect(eng)
        with eng.connect() as conn:
            policies = set(conn.execute(text("SELECT policyname FROM pg_policies WHERE tablename = 'photo_embeddings'"))
                           .scalars())
            secured = conn.execute(text("SELECT relrowsecurity AND relforcerowsecurity FROM pg_class "
                                        "WHERE relname = 'photo_embeddings'")).scalar()
            view = conn.execute(text("SELECT count(*) FROM pg_views WHERE schemaname = 'catalog' "
                                     "AND viewname = 'product_photos'")).scalar_one()
        return {"flags": FLAGS & {c["name"] for c in insp.get_columns("listings")},
                "photos": "photo_embeddings" in insp.get_table_names(), "policies": policies, "secured": secured,
                "view": view}

    migrate.upgrade(eng, "0011")
    up = state()
    assert up == {"flags": FLAGS, "photos": True, "secured": True, "view": 1,
                  "policies": {"tenant_isolation", "system_scope", "admin_system_scope"}}
    migrate.downgrade(eng, "0010")
    assert state()["photos"] is False and state()["view"] == 0 and state()["flags"] == FLAGS
    migrate.downgrade(eng, "0007")
    assert state()["flags"] == set()
    migrate.upgrade(eng, "0011")
    assert state() == up
