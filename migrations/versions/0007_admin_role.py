"""maintenance role: ``enrich_admin``, for the operator commands that are cross-tenant by nature

Migration 0005 forces row-level security on every tenant-scoped table, so the table owner (when
it is not a superuser) is filtered like everyone else: a maintenance command that runs as the
owner with neither a tenant nor a policy of its own sees zero rows. ``enrich backfill``,
``enrich embeddings list|compare|activate|drop``, ``enrich status`` and ``enrich retrain
build-pairs`` read and write every tenant, so they get a role of their own:

* ``enrich_admin`` (cluster-wide, NOLOGIN; created here when missing, like 0005's roles): DML on
  every table and sequence of ``public`` (not on ``alembic_version``: only migrations move it),
  usage of ``public``, ``catalog`` and ``catalog_impl``, the ``catalog`` views and functions, and
  the same privileges on tables and sequences later migrations create. It owns nothing.
* ``admin_system_scope`` on every tenant-scoped table (``TO enrich_admin``):
  ``current_setting('enrich.scope', true) = 'system'``, the same escape ``enrich_worker`` has.
  The maintenance commands set it for each of their transactions (``db.engine.admin_session``).

The commands ``SET ROLE enrich_admin`` after connecting (``ENRICH_DB__ADMIN_ROLE``), so the
operator's login needs membership: ``GRANT enrich_admin TO <login>`` (a DBA step, as for
``enrich_worker``; nothing is granted here). ``SET ROLE`` rather than inherited membership, so the
commands run with exactly this role's privileges and policies whatever the login's INHERIT
setting. Index DDL (``CREATE INDEX CONCURRENTLY`` of ``db.vector_indexes``) needs the table
owner and stays on an owner connection.

Revision ID: 0007
Revises: 0006
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

ADMIN = "enrich_admin"
IMPL = "catalog_impl"
POLICY = "admin_system_scope"

# Frozen copy of 0005's TENANT_SCOPED (not imported: a migration must not change when another does).
TENANT_SCOPED = (
    "dead_letters", "inbox_events", "outbox", "images", "merchants", "duplicate_groups", "groundings",
    "products", "duplicate_members", "listings", "product_images", "embeddings", "enrichment_jobs",
    "preference_pairs", "review_feedback", "field_errors",
)

SYSTEM_PREDICATE = "current_setting('enrich.scope', true) = 'system'"


def _create_role() -> None:
    op.execute(f"""
DO $do$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{ADMIN}') THEN
        CREATE ROLE {ADMIN} NOLOGIN;
    END IF;
END
$do$""")


def _grant() -> None:
    op.execute(f"GRANT USAGE ON SCHEMA public, catalog, {IMPL} TO {ADMIN}")
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {ADMIN}")
    op.execute(f"REVOKE INSERT, UPDATE, DELETE ON public.alembic_version FROM {ADMIN}")
    op.execute(f"GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO {ADMIN}")
    op.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA catalog TO {ADMIN}")
    op.execute(f"GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA catalog TO {ADMIN}")
    # Tables and sequences later migrations create (by the same migrating role) follow suit.
    op.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {ADMIN}")
    op.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO {ADMIN}")


def _revoke() -> None:
    op.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE ALL ON SEQUENCES FROM {ADMIN}")
    op.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE ALL ON TABLES FROM {ADMIN}")
    op.execute(f"REVOKE ALL ON ALL FUNCTIONS IN SCHEMA catalog FROM {ADMIN}")
    op.execute(f"REVOKE ALL ON ALL TABLES IN SCHEMA catalog FROM {ADMIN}")
    op.execute(f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {ADMIN}")
    op.execute(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {ADMIN}")
    op.execute(f"REVOKE ALL ON SCHEMA public, catalog, {IMPL} FROM {ADMIN}")


def _drop_role() -> None:
    """Drop the role unless something else in the cluster still uses it (another database)."""
    op.execute(f"""
DO $do$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{ADMIN}') THEN
        DROP ROLE {ADMIN};
    END IF;
EXCEPTION WHEN dependent_objects_still_exist OR insufficient_privilege THEN
    RAISE NOTICE 'role {ADMIN} kept: %', SQLERRM;
END
$do$""")


def upgrade() -> None:
    _create_role()
    _grant()
    for table in TENANT_SCOPED:
        op.execute(f"CREATE POLICY {POLICY} ON public.{table} TO {ADMIN} "
                   f"USING ({SYSTEM_PREDICATE}) WITH CHECK ({SYSTEM_PREDICATE})")


def downgrade() -> None:
    for table in TENANT_SCOPED:
        op.execute(f"DROP POLICY IF EXISTS {POLICY} ON public.{table}")
    _revoke()
    _drop_role()
