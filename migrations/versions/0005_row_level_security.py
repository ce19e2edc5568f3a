"""row-level security: runtime roles, forced RLS on tenant-scoped tables, tenant-scoped SQL functions

Roles (cluster-wide, NOLOGIN; created here when missing, so the migrating role needs CREATEROLE,
or a DBA creates them beforehand):

* ``enrich_worker``: what the workers ``SET ROLE`` to (``ENRICH_DB__RUNTIME_ROLE``). DML on every
  table, sequences, usage of ``catalog``. Not the owner, so RLS applies.
* ``enrich_reader``: analysts and services. ``catalog`` views and functions, and SELECT on the
  tables those views read (the views are ``security_invoker``, so RLS applies to the reader).

Every tenant-scoped table gets RLS enabled *and forced* (the owner is filtered too; only
superusers and BYPASSRLS roles are not) and two permissive policies:

* ``tenant_isolation`` (every role): ``tenant_id = current_setting('enrich.tenant_id', true)``
  for reading and writing (WITH CHECK), so a transaction sees and writes one tenant, and a
  transaction without a tenant sees nothing (NULL/'' never equals a tenant id);
* ``system_scope`` (``enrich_worker`` only): ``current_setting('enrich.scope', true) = 'system'``,
  the documented escape for platform work that is cross-tenant by nature (outbox relay,
  reconciler, preference-pair building, dead-letter and invalid-event bookkeeping, the job-id →
  tenant lookup of a stage). ``enrich_reader`` cannot use it.

The public ``catalog`` functions take an explicit tenant. Their bodies move unchanged to schema
``catalog_impl`` and ``catalog`` gets thin wrappers with the same signatures: each is SECURITY
INVOKER and carries
``SET enrich.tenant_id = ''`` / ``SET enrich.scope = ''`` clauses, then sets the tenant argument
with ``set_config(..., true)``. PostgreSQL restores a variable named in a function's SET clause
at function exit, so the tenant is the named one for the function's own statements only and the
caller's setting (and any system scope) is back afterwards. SECURITY DEFINER was not chosen: it
would run the search as the owner, who is subject to the same forced policies anyway, and
escalating privileges is not needed for an analyst to read the tenant they name.

Revision ID: 0005
Revises: 0002
"""

from alembic import op

revision = '0005'
down_revision = '0002'
branch_labels = None
depends_on = None

WORKER = "enrich_worker"
READER = "enrich_reader"
IMPL = "catalog_impl"  # the unscoped bodies of the public catalog functions

# Frozen copy of db.tables.TENANT_SCOPED_TABLES at this revision (tests keep them equal).
TENANT_SCOPED = (
    "dead_letters", "inbox_events", "outbox", "images", "merchants", "duplicate_groups", "groundings",
    "products", "duplicate_members", "listings", "product_images", "embeddings", "enrichment_jobs",
    "preference_pairs", "review_feedback", "field_errors",
)
# What the catalog views and functions read: the reader's base-table SELECT.
READER_TABLES = (
    "products", "listings", "embeddings", "images", "product_images", "duplicate_groups",
    "duplicate_members", "groundings", "enrichment_jobs", "model_versions",
)

TENANT_PREDICATE = "tenant_id = current_setting('enrich.tenant_id', true)"
SYSTEM_PREDICATE = "current_setting('enrich.scope', true) = 'system'"

# (name, identity arguments, full parameter list with defaults, argument names to pass on, returns)
_WRAPPED = (
    ("similar_products", "text, text, integer, boolean",
     "tenant text, product_external_id text, k integer DEFAULT 10, same_category boolean DEFAULT false",
     "tenant, product_external_id, k, same_category",
     "TABLE (external_id text, distance double precision, category text, title text)"),
    ("search_by_embedding", "text, vector, integer, text, text",
     "tenant text, query vector, k integer DEFAULT 10, category_filter text DEFAULT NULL, "
     "target text DEFAULT 'image'",
     "tenant, query, k, category_filter, target",
     "TABLE (external_id text, distance double precision, category text, title text)"),
    ("explain_search_by_embedding", "text, vector, integer, text, text",
     "tenant text, query vector, k integer DEFAULT 10, category_filter text DEFAULT NULL, "
     "target text DEFAULT 'image'",
     "tenant, query, k, category_filter, target",
     "SETOF text"),
)


def _create_roles() -> None:
    for role in (WORKER, READER):
        op.execute(f"""
DO $do$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') THEN
        CREATE ROLE {role} NOLOGIN;
    END IF;
END
$do$""")


def _grant() -> None:
    op.execute(f"GRANT USAGE ON SCHEMA public, catalog, {IMPL} TO {WORKER}, {READER}")
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {WORKER}")
    op.execute(f"REVOKE INSERT, UPDATE, DELETE ON public.alembic_version FROM {WORKER}")
    op.execute(f"GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO {WORKER}")
    op.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA catalog TO {WORKER}, {READER}")
    op.execute(f"GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA catalog TO {WORKER}, {READER}")
    op.execute(f"GRANT SELECT ON {', '.join(READER_TABLES)} TO {READER}")
    # Tables and sequences later migrations create (by the same migrating role) follow suit.
    op.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {WORKER}")
    op.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO {WORKER}")


def _revoke() -> None:
    op.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE ALL ON SEQUENCES FROM {WORKER}")
    op.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE ALL ON TABLES FROM {WORKER}")
    op.execute(f"REVOKE ALL ON ALL FUNCTIONS IN SCHEMA catalog FROM {WORKER}, {READER}")
    op.execute(f"REVOKE ALL ON ALL TABLES IN SCHEMA catalog FROM {WORKER}, {READER}")
    op.execute(f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {WORKER}, {READER}")
    op.execute(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {WORKER}, {READER}")
    op.execute(f"REVOKE ALL ON SCHEMA public, catalog, {IMPL} FROM {WORKER}, {READER}")


def _drop_roles() -> None:
    """Drop the roles unless something else in the cluster still uses them (another database)."""
    for role in (READER, WORKER):
        op.execute(f"""
DO $do$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') THEN
        DROP ROLE {role};
    END IF;
EXCEPTION WHEN dependent_objects_still_exist OR insufficient_privilege THEN
    RAISE NOTICE 'role {role} kept: %', SQLERRM;
END
$do$""")


def _enable_rls() -> None:
    for table in TENANT_SCOPED:
        op.execute(f"ALTER TABLE public.{table} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE public.{table} FORCE ROW LEVEL SECURITY")
        op.execute(f"CREATE POLICY tenant_isolation ON public.{table} "
                   f"USING ({TENANT_PREDICATE}) WITH CHECK ({TENANT_PREDICATE})")
        op.execute(f"CREATE POLICY system_scope ON public.{table} TO {WORKER} "
                   f"USING ({SYSTEM_PREDICATE}) WITH CHECK ({SYSTEM_PREDICATE})")


def _disable_rls() -> None:
    for table in TENANT_SCOPED:
        op.execute(f"DROP POLICY IF EXISTS system_scope ON public.{table}")
        op.execute(f"DROP POLICY IF EXISTS tenant_isolation ON public.{table}")
        op.execute(f"ALTER TABLE public.{table} NO FORCE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE public.{table} DISABLE ROW LEVEL SECURITY")


def _wrap_functions() -> None:
    op.execute(f"CREATE SCHEMA {IMPL}")
    for name, identity, params, passed, returns in _WRAPPED:
        # Moved, not renamed: the bodies qualify their parameters with the function name.
        op.execute(f"ALTER FUNCTION catalog.{name}({identity}) SET SCHEMA {IMPL}")
        op.execute(f"""
CREATE FUNCTION catalog.{name}({params})
RETURNS {returns}
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
SET search_path = pg_catalog, public
SET enrich.tenant_id = ''
SET enrich.scope = ''
AS $fn$
BEGIN
    -- Scoped to this call: the SET clauses above restore the caller's values at exit.
    PERFORM set_config('enrich.tenant_id', coalesce({name}.tenant, ''), true);
    RETURN QUERY SELECT * FROM {IMPL}.{name}({', '.join(f'{name}.{a.strip()}' for a in passed.split(','))});
END
$fn$""")
        op.execute(f"GRANT EXECUTE ON FUNCTION catalog.{name}({identity}) TO {WORKER}, {READER}")
        op.execute(f"""
DO $do$
BEGIN
    EXECUTE format('COMMENT ON FUNCTION catalog.{name}({identity}) IS %L',
                   obj_description('{IMPL}.{name}({identity})'::regprocedure, 'pg_proc'));
END
$do$""")


def _unwrap_functions() -> None:
    for name, identity, *_ in _WRAPPED:
        op.execute(f"DROP FUNCTION IF EXISTS catalog.{name}({identity})")
        op.execute(f"ALTER FUNCTION {IMPL}.{name}({identity}) SET SCHEMA catalog")
    op.execute(f"DROP SCHEMA IF EXISTS {IMPL}")


def upgrade() -> None:
    _create_roles()
    _wrap_functions()
    _grant()
    _enable_rls()


def downgrade() -> None:
    _disable_rls()
    _revoke()
    _unwrap_functions()
    _drop_roles()
