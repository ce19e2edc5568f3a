"""bookkeeping retention (issue 17): hourly summaries, resolvable dead letters, pruning indexes

What the pruner (``tasks.maintenance.retention``, beat task ``catalog.prune``, ``enrich prune``)
needs:

* ``job_summaries`` (hour, status, error_code) → jobs, and ``job_stage_timings`` (hour, stage,
  le_ms) → jobs, sum_ms: finished jobs folded into hourly counts and fixed-bucket stage-timing
  histograms in the transaction that deletes them, so ``enrich status`` (live rows + summaries)
  never loses a figure to pruning. ``inbox_summaries`` (hour, event_type, status) → events does the
  same for the inbox. Platform-level, like ``model_versions``: no tenant column, no row-level
  security; DML granted to ``enrich_worker`` (beat) and ``enrich_admin`` (``enrich prune``).
* ``retention_cursors``: how far a pruning pass has read an ordered input: finished jobs by
  (finished_at, id) for the result-document and job passes, inbox events by (received_at,
  event_id), so no pass re-reads the rows it decided to keep.
* ``dead_letters.resolved_at`` / ``resolution`` (``replayed`` | ``discarded``): dead letters are
  kept until resolved (``enrich dead-letters replay|discard``), then pruned after a grace period.
* Indexes the pruning reads by: published outbox rows by publication time, inbox events by
  (received_at, event_id), finished jobs by (finished_at, id), dead letters by resolution (a
  product's jobs are found through 0002's ``ix_enrichment_jobs_product_id_product_version``).

Autovacuum on ``inbox_events`` and ``enrichment_jobs`` starts at 2 % dead rows instead of 20 %: with
retention they lose about a day of rows every day, but keep a product's newest job (and its inbox
row) for the whole catalog, so at the default factor a vacuum would wait for weeks of deletions.

The indexes are created ``IF NOT EXISTS``: on a large existing deployment, build them first with
``CREATE INDEX CONCURRENTLY`` under the same names and this migration only adds the rest.

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

WORKER, ADMIN = "enrich_worker", "enrich_admin"
SUMMARY_TABLES = ("job_summaries", "job_stage_timings", "inbox_summaries", "retention_cursors")
TZ = sa.DateTime(timezone=True)
VACUUMED_SOONER = ("inbox_events", "enrichment_jobs")

# (name, table, columns, predicate)
INDEXES = (
    ("ix_outbox_published_at", "outbox", "published_at", "published_at IS NOT NULL"),
    ("ix_inbox_events_received_at_event_id", "inbox_events", "received_at, event_id", None),
    ("ix_enrichment_jobs_finished_at_id", "enrichment_jobs", "finished_at, id", "finished_at IS NOT NULL"),
    ("ix_dead_letters_resolved_at", "dead_letters", "resolved_at", "resolved_at IS NOT NULL"),
    ("ix_dead_letters_unresolved", "dead_letters", "id", "resolved_at IS NULL"),
)


def _create_tables() -> None:
    op.create_table(
        "job_summaries",
        sa.Column("hour", TZ, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error_code", sa.String(64), nullable=False, server_default=""),
        sa.Column("jobs", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("hour", "status", "error_code", name=op.f("pk_job_summaries")),
    )
    op.create_table(
        "job_stage_timings",
        sa.Column("hour", TZ, nullable=False),
        sa.Column("stage", sa.String(32), nullable=False),
        sa.Column("le_ms", sa.Float(), nullable=False),
        sa.Column("jobs", sa.BigInteger(), nullable=False),
        sa.Column("sum_ms", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("hour", "stage", "le_ms", name=op.f("pk_job_stage_timings")),
    )
    op.create_table(
        "inbox_summaries",
        sa.Column("hour", TZ, nullable=False),
        sa.Column("event_type", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("events", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("hour", "event_type", "status", name=op.f("pk_inbox_summaries")),
    )
    op.create_table(
        "retention_cursors",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("position_at", TZ, nullable=False),
        sa.Column("position_key", sa.String(64), nullable=False),
        sa.Column("updated_at", TZ, nullable=False, server_default=sa.text("now()")),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_retention_cursors")),
    )
    for table in SUMMARY_TABLES:
        op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON public.{table} TO {WORKER}, {ADMIN}")


def _add_dead_letter_resolution() -> None:
    op.add_column("dead_letters", sa.Column("resolved_at", TZ, nullable=True))
    op.add_column("dead_letters", sa.Column("resolution", sa.String(16), nullable=True))
    op.create_check_constraint(op.f("ck_dead_letters_resolution"), "dead_letters",
                               "resolution IS NULL OR resolution IN ('replayed', 'discarded')")
    op.create_check_constraint(op.f("ck_dead_letters_resolved_together"), "dead_letters",
                               "(resolution IS NULL) = (resolved_at IS NULL)")


def upgrade() -> None:
    _create_tables()
    _add_dead_letter_resolution()
    for name, table, columns, predicate in INDEXES:
        where = f" WHERE {predicate}" if predicate else ""
        op.execute(f"CREATE INDEX IF NOT EXISTS {name} ON public.{table} ({columns}){where}")
    for table in VACUUMED_SOONER:
        op.execute(f"ALTER TABLE public.{table} SET (autovacuum_vacuum_scale_factor = 0.02, "
                   "autovacuum_analyze_scale_factor = 0.02)")


def downgrade() -> None:
    for table in VACUUMED_SOONER:
        op.execute(f"ALTER TABLE public.{table} RESET (autovacuum_vacuum_scale_factor, "
                   "autovacuum_analyze_scale_factor)")
    for name, *_ in reversed(INDEXES):
        op.execute(f"DROP INDEX IF EXISTS public.{name}")
    op.drop_constraint(op.f("ck_dead_letters_resolved_together"), "dead_letters", type_="check")
    op.drop_constraint(op.f("ck_dead_letters_resolution"), "dead_letters", type_="check")
    op.drop_column("dead_letters", "resolution")
    op.drop_column("dead_letters", "resolved_at")
    for table in reversed(SUMMARY_TABLES):
        op.drop_table(table)
