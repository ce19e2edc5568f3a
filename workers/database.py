"""Resolve which database this process uses (configured URL or the embedded server), once."""

from __future__ import annotations

import threading

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from db.embedded import start_embedded
from db.engine import make_engine, make_sessionmaker
from workers.logs import get_logger
from workers.settings import Settings, get_settings

log = get_logger(__name__)
_lock = threading.Lock()
_engine: Engine | None = None
_factory: sessionmaker[Session] | None = None
_admin_engine: Engine | None = None
_admin_factory: sessionmaker[Session] | None = None


def database_url(settings: Settings | None = None) -> str:
    settings = settings or get_settings()
    if settings.db.url:
        return settings.db.url
    return start_embedded(settings.embedded_db_dir)


def get_engine(settings: Settings | None = None) -> Engine:
    global _engine, _factory
    with _lock:
        if _engine is None:
            settings = settings or get_settings()
            url = database_url(settings)
            _engine = make_engine(url, pool_size=settings.db.pool_size,
                                  statement_timeout_ms=settings.db.statement_timeout_ms,
                                  runtime_role=settings.db.runtime_role)
            _factory = make_sessionmaker(_engine)
            log.info("db.selected", embedded=not settings.db.url,
                     url=_engine.url.render_as_string(hide_password=True))
        return _engine


def get_owner_engine(settings: Settings | None = None) -> Engine:
    """A fresh engine that stays the connecting role (no ``SET ROLE``): for migrations and the
    HNSW index DDL of ``db.vector_indexes``, which create and alter objects the runtime and
    maintenance roles may only use. The caller disposes of it."""
    settings = settings or get_settings()
    return make_engine(database_url(settings), pool_size=1, statement_timeout_ms=0)


def get_session_factory() -> sessionmaker[Session]:
    get_engine()
    assert _factory is not None
    return _factory


def get_admin_session_factory(settings: Settings | None = None) -> sessionmaker[Session]:
    """Sessions of the maintenance commands: connections ``SET ROLE`` to ``ENRICH_DB__ADMIN_ROLE``
    (``enrich_admin``), whose policies admit the system scope (``db.engine.admin_session``).
    Built once per process, beside the workers' engine (which may run as ``enrich_worker``)."""
    global _admin_engine, _admin_factory
    with _lock:
        if _admin_factory is None:
            settings = settings or get_settings()
            _admin_engine = make_engine(database_url(settings), pool_size=2,
                                        statement_timeout_ms=settings.db.statement_timeout_ms,
                                        application_name="catalog-enrich-admin",
                                        runtime_role=settings.db.admin_role)
            _admin_factory = make_sessionmaker(_admin_engine)
            log.info("db.admin_role", role=settings.db.admin_role or "(connecting role)")
        return _admin_factory


def reset_engine() -> None:
    """Forget this process's engines (after fork, or when tests switch databases)."""
    global _engine, _factory, _admin_engine, _admin_factory
    with _lock:
        for engine in (_engine, _admin_engine):
            if engine is not None:
                engine.dispose(close=False)
        _engine, _factory, _admin_engine, _admin_factory = None, None, None, None
