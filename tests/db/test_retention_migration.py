"""Migration 0010 (retention) goes up and down cleanly on a database with rows in it, and its new
system tables carry the grants the pruner's roles need (and no row-level security)."""

from __future__ import annotations

from sqlalchemy import inspect, text

from db import migrate

NEW_TABLES = {"job_summaries", "job_stage_timings", "inbox_summaries", "retention_cursors"}
NEW_INDEXES = {"ix_outbox_published_at", "ix_inbox_events_received_at_event_id", "ix_enrichment_jobs_finished_at_id",
               "ix_dead_letters_resolved_at", "ix_dead_letters_unresolved"}


def test_0010_up_down_up_keeps_rows_and_removes_what_it_created(scratch_engine) -> None:  # noqa: ANN001
    eng = scratch_engine("migration_0010")

    def state() -> dict[str, object]:
        insp = inspect(eng)
        with eng.connect() as conn:
            indexes = set(conn.execute(text("SELECT indexname FROM pg_indexes WHERE schemaname = 'public'")).scalars())
            grants = conn.execute(text(
                "SELECT bool_and(has_table_privilege(r, 'public.job_summaries', 'SELECT, INSERT, UPDATE, DELETE')) "
                "FROM unnest(ARRAY['enrich_worker', 'enrich_admin']) r")).scalar_one() \
                if "job_summaries" in insp.get_table_names() else None
            rls = set(conn.execute(text("SELECT relname FROM pg_class WHERE relrowsecurity "
                                        "AND relname = ANY(:t)"), {"t": sorted(NEW_TABLES)}).scalars())
            letters = conn.execute(text("SELECT count(*) FROM dead_letters")).scalar_one()
            tuned = set(conn.execute(text("SELECT relname FROM pg_class WHERE relname IN ('inbox_events', "
                                          "'enrichment_jobs') AND 'autovacuum_vacuum_scale_factor=0.02' "
                                          "= ANY(reloptions)")).scalars())
        return {"tables": NEW_TABLES & set(insp.get_table_names()), "indexes": NEW_INDEXES & indexes, "tuned": tuned,
                "columns": {c["name"] for c in insp.get_columns("dead_letters")} & {"resolved_at", "resolution"},
                "grants": grants, "rls": rls, "dead_letters": letters}

    migrate.upgrade(eng, "0009")
    with eng.begin() as conn:
        conn.execute(text("INSERT INTO dead_letters (queue, reason, body) VALUES ('q', 'poison', '\\x00')"))
    migrate.upgrade(eng, "0010")
    up = state()
    assert up == {"tables": NEW_TABLES, "indexes": NEW_INDEXES, "columns": {"resolved_at", "resolution"},
                  "grants": True, "rls": set(), "dead_letters": 1, "tuned": {"inbox_events", "enrichment_jobs"}}
    with eng.begin() as conn:  # an existing dead letter is unresolved; half a resolution is refused
        assert conn.execute(text("SELECT resolved_at IS NULL AND resolution IS NULL FROM dead_letters")).scalar()
        refused = conn.execute(text("SELECT count(*) FROM pg_constraint WHERE conname IN "
                                    "('ck_dead_letters_resolution', 'ck_dead_letters_resolved_together')"))
        assert refused.scalar_one() == 2
    migrate.downgrade(eng, "0009")
    assert state() == {"tables": set(), "indexes": set(), "columns": set(), "grants": None, "rls": set(),
                       "dead_letters": 1, "tuned": set()}
    migrate.upgrade(eng, "0010")
    assert state() == up


def test_a_half_resolved_dead_letter_is_refused(db_session) -> None:  # noqa: ANN001
    import pytest
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError, match="ck_dead_letters_resolved_together"):
        with db_session.begin_nested():
            db_session.execute(text("INSERT INTO dead_letters (queue, reason, body, resolution) "
                                    "VALUES ('q', 'poison', '\\x00', 'replayed')"))
