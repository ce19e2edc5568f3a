"""Engine creation, pgvector registration on connect, and the one-transaction session scopes
(unit of work, tenant, system, maintenance, job)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker


class DatabaseUnavailable(RuntimeError):
    """The configured database cannot be used; the message names the setting to fix."""


def normalise_url(url: str) -> str:
    """Accept plain libpq URLs (postgresql://, postgres://) and pick the psycopg 3 driver."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def make_engine(url: str, *, pool_size: int = 5, statement_timeout_ms: int = 30_000,
                application_name: str = "catalog-enrich", runtime_role: str | None = None) -> Engine:
    """``runtime_role``: every pooled connection does ``SET ROLE`` to it right after connecting, so
    the application runs as a non-owner role that row-level security applies to."""
    options = f"-c statement_timeout={statement_timeout_ms}" if statement_timeout_ms else ""
    engine = create_engine(
        normalise_url(url),
        pool_size=pool_size,
        pool_pre_ping=True,
        connect_args={"application_name": application_name, "options": options},
    )

    @event.listens_for(engine, "connect")
    def _register_vector(dbapi_conn, _record) -> None:  # noqa: ANN001
        # The vector type only exists after the first migration; registering fails before it.
        try:
            register_vector(dbapi_conn)
        except Exception:  # noqa: BLE001
            dbapi_conn.rollback()

    if runtime_role:
        @event.listens_for(engine, "connect")
        def _set_runtime_role(dbapi_conn, _record) -> None:  # noqa: ANN001
            try:
                with dbapi_conn.cursor() as cur:
                    cur.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(runtime_role)))
            except (psycopg.errors.InsufficientPrivilege, psycopg.errors.InvalidParameterValue) as exc:
                # Not a transient error: one line that names the fix instead of a driver traceback.
                login = dbapi_conn.info.user
                raise DatabaseUnavailable(
                    f"login {login} cannot SET ROLE {runtime_role} ({str(exc).strip()}); the migrations create "
                    f"the role (enrich db upgrade) and a DBA grants it (GRANT {runtime_role} TO {login}), or "
                    "configure another role (ENRICH_DB__RUNTIME_ROLE for workers, ENRICH_DB__ADMIN_ROLE for "
                    "maintenance commands)"
                ) from None
            dbapi_conn.commit()

    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False, autoflush=True)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error. Helpers only flush()."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def set_tenant(session: Session, tenant_id: str) -> None:
    """Scope the current transaction to one tenant (row-level security reads this)."""
    session.execute(text("SELECT set_config('enrich.tenant_id', :t, true)"), {"t": tenant_id})


def set_system_scope(session: Session) -> None:
    """Let the current transaction see every tenant's rows (the ``system_scope`` policies of
    migration 0005 for the runtime role ``enrich_worker``, ``admin_system_scope`` of 0007 for the
    maintenance role ``enrich_admin``; no other role). For work that is cross-tenant by nature:
    the outbox relay, the reconciler, preference-pair building, dead-letter and invalid-event
    bookkeeping, and the maintenance commands (``admin_session``). Ends with the transaction."""
    session.execute(text("SELECT set_config('enrich.scope', 'system', true)"))


# Whether row-level security lets this transaction read every tenant of ``listings`` (the
# tenant-scoped tables share their policies): superuser or BYPASSRLS, RLS off or not forced on
# the owner, or the system scope set for a role one of the system-scope policies (0005, 0007)
# applies to (policies apply to members that inherit, as pg_has_role 'USAGE' tells).
_SEES_EVERY_TENANT = text("""
    SELECT r.rolsuper OR r.rolbypassrls OR NOT c.relrowsecurity
        OR (NOT c.relforcerowsecurity AND pg_has_role(r.oid, c.relowner, 'USAGE'))
        OR (current_setting('enrich.scope', true) = 'system' AND EXISTS (
            SELECT 1 FROM pg_policy p, unnest(p.polroles) AS pr(role)
            WHERE p.polrelid = c.oid AND p.polname IN ('system_scope', 'admin_system_scope')
              AND CASE WHEN pr.role = 0 THEN true ELSE pg_has_role(r.oid, pr.role, 'USAGE') END))
    FROM pg_roles r, pg_class c
    WHERE r.rolname = current_user AND c.oid = to_regclass('public.listings')
""")


def sees_every_tenant(session: Session) -> bool:
    """Whether this transaction reads every tenant's rows; False means a tenant-scoped count of
    zero may only be rows that row-level security hides (the owner without a policy, say)."""
    return bool(session.execute(_SEES_EVERY_TENANT).scalar_one_or_none())


@contextmanager
def tenant_session(factory: sessionmaker[Session], tenant_id: str) -> Iterator[Session]:
    """One transaction scoped to ``tenant_id``: commit on success, roll back on error."""
    with factory() as session, session.begin():
        set_tenant(session, tenant_id)
        yield session


@contextmanager
def system_session(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One transaction in the system scope (see ``set_system_scope``)."""
    with factory() as session, session.begin():
        set_system_scope(session)
        yield session


@contextmanager
def admin_session(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One maintenance transaction in the system scope: commit on success, roll back on error.

    For the operator commands that read and write every tenant (``enrich backfill``,
    ``enrich embeddings …``, ``enrich status``, ``enrich retrain build-pairs``). ``factory`` must
    run as the maintenance role (``workers.database.get_admin_session_factory``: ``SET ROLE
    enrich_admin``), whose ``admin_system_scope`` policies (migration 0007) admit the scope. The
    table owner has no such policy and, under forced row-level security, would see no rows: a
    role that cannot see every tenant is refused here (``DatabaseUnavailable``) rather than left
    to report an empty catalog."""
    with factory() as session, session.begin():
        set_system_scope(session)
        if not sees_every_tenant(session):
            role, login = session.execute(text("SELECT current_user, session_user")).one()
            raise DatabaseUnavailable(
                f"role {role} cannot see every tenant under row-level security (no system-scope policy applies "
                f"to it), so this maintenance command would see an empty catalog; run it as enrich_admin "
                f"(migration 0007): ENRICH_DB__ADMIN_ROLE=enrich_admin, and a DBA runs GRANT enrich_admin TO {login}")
        yield session


@contextmanager
def job_session(factory: sessionmaker[Session], job_id: int) -> Iterator[Session]:
    """One transaction scoped to the tenant that owns enrichment job ``job_id``.

    Stage messages carry job ids only, so the tenant is looked up first: one primary-key read in
    the system scope, which is dropped before any other statement runs. An unknown job leaves the
    transaction with no tenant at all (it sees nothing). The three steps go to the server as one
    simple-protocol query (``_job_scope``): every stage transaction starts here, several times per
    product, and each step alone was a round trip of its own."""
    with factory() as session, session.begin():
        session.connection().exec_driver_sql(_job_scope(job_id))
        yield session


def _job_scope(job_id: int) -> str:
    """The system scope, the job's tenant read under it, the scope dropped: three statements run
    in order in one query. The id is formatted as an integer (the simple protocol takes no
    parameters); an unknown job sets the tenant to '', which matches no row."""
    return ("SELECT set_config('enrich.scope', 'system', true); "
            "SELECT set_config('enrich.tenant_id', coalesce((SELECT tenant_id FROM enrichment_jobs "
            f"WHERE id = {int(job_id)}), ''), true); "
            "SELECT set_config('enrich.scope', '', true)")


def check_database(engine: Engine) -> dict[str, str | None]:
    """Server version, pgvector availability/version. Raises DatabaseUnavailable with the fix."""
    try:
        with engine.connect() as conn:
            server = conn.execute(text("SHOW server_version")).scalar_one()
            available = conn.execute(
                text("SELECT default_version FROM pg_available_extensions WHERE name = 'vector'")
            ).scalar_one_or_none()
            installed = conn.execute(
                text("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
            ).scalar_one_or_none()
    except Exception as exc:  # noqa: BLE001
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0] if str(exc) else type(exc).__name__
        raise DatabaseUnavailable(
            f"database unreachable ({reason}); fix ENRICH_DB__URL or leave it empty for the embedded database"
        ) from exc
    if available is None and installed is None:
        raise DatabaseUnavailable(
            f"PostgreSQL {server} at ENRICH_DB__URL has no pgvector extension available; "
            "install pgvector >= 0.7 on that server or leave ENRICH_DB__URL empty for the embedded database"
        )
    return {"server_version": server, "pgvector_available": available, "pgvector_installed": installed}
