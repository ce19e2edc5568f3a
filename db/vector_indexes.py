"""The partial HNSW indexes of the embeddings table, one pair per embedding size.

Embeddings of every clip version live in one table with a ``dims`` column; each size gets its own
partial indexes ``((col::vector(dims)) vector_cosine_ops) WHERE dims = dims`` for the image and the
text column, created when a version of a new size is registered and dropped when no version of
that size is left. On an ``Engine`` the DDL runs ``CONCURRENTLY`` in autocommit (writers keep
writing); on a ``Session`` or ``Connection`` it runs in the caller's transaction (tests, migrations).
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Connection, Engine, text
from sqlalchemy.orm import Session

HNSW_MAX_DIMS = 2000  # pgvector's HNSW limit for the vector type
EMBEDDING_COLUMNS = ("image_embedding", "text_embedding")

Bind = Session | Connection | Engine


class DimensionError(ValueError):
    """An embedding size the indexes cannot have."""


def check_dims(dims: int) -> int:
    if not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= HNSW_MAX_DIMS:
        raise DimensionError(f"embedding dims must be an integer in 1..{HNSW_MAX_DIMS}, got {dims!r}")
    return dims


def index_names(dims: int) -> list[str]:
    return [f"ix_embeddings_{column}_{check_dims(dims)}_hnsw" for column in EMBEDDING_COLUMNS]


def _run_ddl(bind: Bind, statements: Callable[[bool], list[str]]) -> None:
    """Engine: CONCURRENTLY in autocommit (writers keep writing). Session/Connection: in their transaction."""
    if isinstance(bind, Engine):
        with bind.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            for sql in statements(True):
                conn.execute(text(sql))
    else:
        for sql in statements(False):
            bind.execute(text(sql))


def _index_validity(bind: Bind, name: str) -> bool | None:
    sql = text("SELECT i.indisvalid FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid "
               "WHERE c.relname = :name AND c.relnamespace = 'public'::regnamespace")
    if isinstance(bind, Engine):
        with bind.connect() as conn:
            return conn.execute(sql, {"name": name}).scalar_one_or_none()
    return bind.execute(sql, {"name": name}).scalar_one_or_none()


def has_dimension_index(bind: Bind, dims: int) -> bool:
    return all(_index_validity(bind, name) is True for name in index_names(dims))


def ensure_dimension_index(bind: Bind, dims: int) -> list[str]:
    """Create the partial HNSW indexes ``((col::vector(dims)) vector_cosine_ops) WHERE dims = dims``.

    Idempotent; an invalid index left by an interrupted CONCURRENTLY build is rebuilt. Returns the
    names created. Identifiers and the dimension come from the validated integer only.
    """
    dims = check_dims(dims)
    created: list[str] = []
    for column, name in zip(EMBEDDING_COLUMNS, index_names(dims), strict=True):
        valid = _index_validity(bind, name)
        if valid is True:
            continue

        def ddl(concurrently: bool, column: str = column, name: str = name, valid: bool | None = valid) -> list[str]:
            how = " CONCURRENTLY" if concurrently else ""
            out = [f"DROP INDEX{how} IF EXISTS {name}"] if valid is False else []
            out.append(f"CREATE INDEX{how} IF NOT EXISTS {name} ON embeddings USING hnsw "
                       f"(({column}::vector({dims})) vector_cosine_ops) WHERE dims = {dims}")
            return out

        _run_ddl(bind, ddl)
        created.append(name)
    return created


def drop_dimension_index(bind: Bind, dims: int) -> list[str]:
    names = index_names(dims)
    _run_ddl(bind, lambda concurrently: [
        f"DROP INDEX{' CONCURRENTLY' if concurrently else ''} IF EXISTS {name}" for name in names])
    return names
