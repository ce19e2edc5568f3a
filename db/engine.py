"""Engine creation, pgvector registration on connect, and the one-transaction session scope."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from pgvector.psycopg import register_vector
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
                application_name: str = "catalog-enrich") -> Engine:
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
