"""The partial HNSW indexes of the embeddings table, one pair per embedding size.

Embeddings of every clip version live in one table with a ``dims`` column; each size gets its own
partial indexes ``((col::vector(dims)) vector_cosine_ops) WHERE dims = dims`` for the image and the
text column, created when a version of a new size is registered and dropped when no version of
that size is left. On an ``Engine`` the DDL runs ``CONCURRENTLY`` in autocommit (writers keep
writing); on a ``Session`` or ``Connection`` it runs in the caller's transaction (tests, migrations).

With a size's indexes comes its search function ``catalog_impl.nearest_<dims>`` (migration 0013:
the unfiltered search as static SQL, planned once per session); without it searches of that size
still work, planned per call. Per-category partial indexes (``ensure_category_indexes``) are an
option for catalogues whose category-filtered searches matter: the filtered search plans per call,
so the planner takes the category's own, smaller graph instead of walking the global one past
every other category (issue 16 measures both; they cost a second copy of the image index).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, text
from sqlalchemy.orm import Session

HNSW_MAX_DIMS = 2000  # pgvector's HNSW limit for the vector type
EMBEDDING_COLUMNS = ("image_embedding", "text_embedding")
PRECISIONS = ("vector", "halfvec")  # what the HNSW graph is built on; halfvec: half the index size

Bind = Session | Connection | Engine


class DimensionError(ValueError):
    """An embedding size (or an index option) the indexes cannot have."""


@dataclass(frozen=True)
class HnswGraph:
    """The HNSW build parameters of an index: neighbours per node and the build's candidate list."""

    m: int = 24
    ef_construction: int = 128

    def __post_init__(self) -> None:
        # pgvector's own bounds: m 2..100, ef_construction 4..1000 and at least 2 * m
        if not (isinstance(self.m, int) and 2 <= self.m <= 100):
            raise DimensionError(f"HNSW m must be an integer in 2..100, got {self.m!r}")
        if not (isinstance(self.ef_construction, int) and 4 <= self.ef_construction <= 1000
                and self.ef_construction >= 2 * self.m):
            raise DimensionError(f"HNSW ef_construction must be an integer in 4..1000 and at least 2 * m "
                                 f"({2 * self.m}), got {self.ef_construction!r}")

    def with_clause(self) -> str:
        return f"WITH (m = {int(self.m)}, ef_construction = {int(self.ef_construction)})"


DEFAULT_GRAPH = HnswGraph()
PGVECTOR_DEFAULT_GRAPH = HnswGraph(16, 64)  # what an index built without options has (migration 0001's)


def check_dims(dims: int) -> int:
    if not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= HNSW_MAX_DIMS:
        raise DimensionError(f"embedding dims must be an integer in 1..{HNSW_MAX_DIMS}, got {dims!r}")
    return dims


def index_names(dims: int) -> list[str]:
    return [f"ix_embeddings_{column}_{check_dims(dims)}_hnsw" for column in EMBEDDING_COLUMNS]


def _scalar(bind: Bind, sql: str, params: dict[str, object] | None = None) -> object:
    if isinstance(bind, Engine):
        with bind.connect() as conn:
            return conn.execute(text(sql), params or {}).scalar_one_or_none()
    return bind.execute(text(sql), params or {}).scalar_one_or_none()


def _search_function(bind: Bind, dims: int, action: str) -> bool:
    """``catalog_impl._install_nearest(dims)`` / ``_drop_nearest(dims)`` when the schema has them
    (migration 0013 onwards). Returns whether it ran."""
    helper = {"install": "_install_nearest", "drop": "_drop_nearest"}[action]
    if _scalar(bind, f"SELECT to_regprocedure('catalog_impl.{helper}(integer)') IS NOT NULL") is not True:
        return False
    sql = f"SELECT catalog_impl.{helper}(:dims)::text"
    if isinstance(bind, Engine):
        with bind.begin() as conn:
            conn.execute(text(sql), {"dims": dims})
    else:
        bind.execute(text(sql), {"dims": dims})
    return True


def has_search_function(bind: Bind, dims: int) -> bool:
    return _scalar(bind, "SELECT to_regprocedure(:sig) IS NOT NULL", {
        "sig": f"catalog_impl.nearest_{check_dims(dims)}(text, vector, integer, text, bigint, integer, text)"
    }) is True


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


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise DimensionError(f"index precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def index_precision(bind: Bind, dims: int) -> str | None:
    """What the size's image index is built on (``vector`` / ``halfvec``); None without one."""
    definition = _scalar(bind, "SELECT pg_get_indexdef(c.oid) FROM pg_class c WHERE c.relname = :name "
                               "AND c.relnamespace = 'public'::regnamespace AND c.relkind = 'i'",
                         {"name": index_names(dims)[0]})
    if definition is None:
        return None
    return "halfvec" if "halfvec_cosine_ops" in str(definition) else "vector"


def index_graph(bind: Bind, name: str) -> HnswGraph | None:
    """The graph an index was built with (its reloptions; pgvector's defaults where none is set);
    None without such an index."""
    options = _scalar(bind, "SELECT coalesce(c.reloptions, '{}') FROM pg_class c WHERE c.relname = :name "
                            "AND c.relnamespace = 'public'::regnamespace AND c.relkind = 'i'", {"name": name})
    if options is None:
        return None
    given = dict(str(o).split("=", 1) for o in options)  # type: ignore[union-attr]
    return HnswGraph(int(given.get("m", PGVECTOR_DEFAULT_GRAPH.m)),
                     int(given.get("ef_construction", PGVECTOR_DEFAULT_GRAPH.ef_construction)))


def _leftover_rebuilds(bind: Bind, name: str) -> list[str]:
    """Invalid ``<name>_ccnew*`` indexes an interrupted ``REINDEX CONCURRENTLY`` left behind."""
    sql = text("SELECT c.relname FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid WHERE NOT i.indisvalid "
               "AND c.relname LIKE :like AND c.relnamespace = 'public'::regnamespace ORDER BY 1")
    like = name.replace("_", r"\_") + r"\_ccnew%"
    if isinstance(bind, Engine):
        with bind.connect() as conn:
            return list(conn.execute(sql, {"like": like}).scalars())
    return list(bind.execute(sql, {"like": like}).scalars())


def ensure_dimension_index(bind: Bind, dims: int, precision: str = "vector",
                           graph: HnswGraph = DEFAULT_GRAPH) -> list[str]:
    """Create the partial HNSW indexes ``((col::<precision>(dims)) <precision>_cosine_ops) WHERE dims = dims``,
    built with ``graph``.

    ``precision``: ``vector`` (default) or ``halfvec`` (half the index size, its graph walked in
    half precision; the stored vectors and the distances returned stay single precision).
    Idempotent; an invalid index left by an interrupted CONCURRENTLY build, or one of the other
    precision, is dropped and built again; a valid one of another graph gets the new options and a
    ``REINDEX`` (``CONCURRENTLY`` on an Engine: built beside it and swapped, searches keep an index
    throughout). Returns the names created or rebuilt. Identifiers and the dimension come from the
    validated integer only. Installs (or refreshes) the size's search function.
    """
    dims, precision = check_dims(dims), check_precision(precision)
    created: list[str] = []
    current = index_precision(bind, dims)
    for column, name in zip(EMBEDDING_COLUMNS, index_names(dims), strict=True):
        valid = _index_validity(bind, name)
        leftovers = _leftover_rebuilds(bind, name)
        if valid is True and current == precision and index_graph(bind, name) == graph and not leftovers:
            continue
        regraph = valid is True and current == precision  # the same index, another graph (or only leftovers)
        stale = regraph and index_graph(bind, name) != graph
        rebuild = valid is False or (valid is True and current != precision)

        def ddl(concurrently: bool, column: str = column, name: str = name, rebuild: bool = rebuild,
                regraph: bool = regraph, stale: bool = stale, leftovers: list[str] = leftovers) -> list[str]:
            how = " CONCURRENTLY" if concurrently else ""
            out = [f"DROP INDEX{how} IF EXISTS {old}" for old in leftovers]
            if regraph:
                if stale:
                    out += [f"ALTER INDEX {name} SET (m = {graph.m}, ef_construction = {graph.ef_construction})",
                            f"REINDEX INDEX{how} {name}"]
                return out
            if rebuild:
                out.append(f"DROP INDEX{how} IF EXISTS {name}")
            out.append(f"CREATE INDEX{how} IF NOT EXISTS {name} ON embeddings USING hnsw "
                       f"(({column}::{precision}({dims})) {precision}_cosine_ops) {graph.with_clause()} "
                       f"WHERE dims = {dims}")
            return out

        _run_ddl(bind, ddl)
        created.append(name)
    _search_function(bind, dims, "install")  # idempotent (CREATE OR REPLACE)
    return created


def drop_dimension_index(bind: Bind, dims: int) -> list[str]:
    names = index_names(dims) + category_index_names(bind, dims)
    _run_ddl(bind, lambda concurrently: [
        f"DROP INDEX{' CONCURRENTLY' if concurrently else ''} IF EXISTS {name}" for name in names])
    _search_function(bind, dims, "drop")
    return names


# ---------------------------------------------------------------- per-category indexes (optional)

CATEGORY_INDEX_PREFIX = "ix_embeddings_image_embedding_{dims}_cat_"


def category_index_name(dims: int, category: str) -> str:
    """A safe identifier whatever the category's spelling: a digest, the category in the comment."""
    if not isinstance(category, str) or not category or len(category) > 64:
        raise ValueError(f"category must be a non-empty string of at most 64 characters, got {category!r}")
    digest = hashlib.sha256(category.encode()).hexdigest()[:12]
    return CATEGORY_INDEX_PREFIX.format(dims=check_dims(dims)) + digest


def category_index_names(bind: Bind, dims: int) -> list[str]:
    like = CATEGORY_INDEX_PREFIX.format(dims=check_dims(dims)).replace("_", r"\_") + "%"
    sql = text("SELECT c.relname FROM pg_class c WHERE c.relkind = 'i' AND c.relname LIKE :like "
               "AND c.relnamespace = 'public'::regnamespace ORDER BY 1")
    if isinstance(bind, Engine):
        with bind.connect() as conn:
            return list(conn.execute(sql, {"like": like}).scalars())
    return list(bind.execute(sql, {"like": like}).scalars())


def ensure_category_indexes(bind: Bind, dims: int, categories: Iterable[str],
                            graph: HnswGraph = DEFAULT_GRAPH) -> list[str]:
    """Partial HNSW indexes of the image column per category
    (``... WHERE dims = <dims> AND category = '<category>'``), on the precision of the size's index
    (build them after choosing it), built with ``graph``. Idempotent like ``ensure_dimension_index``; returns the names
    created. The category is a quoted literal (``''`` doubled), its index name a digest."""
    dims = check_dims(dims)
    precision = index_precision(bind, dims) or "vector"  # the filtered search orders by the size's precision
    created: list[str] = []
    for category in sorted(set(categories)):
        name = category_index_name(dims, category)
        valid = _index_validity(bind, name)
        if valid is True:
            continue
        literal = "'" + category.replace("'", "''") + "'"

        def ddl(concurrently: bool, name: str = name, literal: str = literal,
                valid: bool | None = valid) -> list[str]:
            how = " CONCURRENTLY" if concurrently else ""
            out = [f"DROP INDEX{how} IF EXISTS {name}"] if valid is False else []
            out.append(f"CREATE INDEX{how} IF NOT EXISTS {name} ON embeddings USING hnsw "
                       f"((image_embedding::{precision}({dims})) {precision}_cosine_ops) {graph.with_clause()} "
                       f"WHERE dims = {dims} AND category = {literal}")
            out.append(f"COMMENT ON INDEX {name} IS {literal}")
            return out

        _run_ddl(bind, ddl)
        created.append(name)
    return created


def indexed_categories(bind: Bind, dims: int) -> list[str]:
    """Categories that have their own index (from the index comments)."""
    sql = text("SELECT obj_description(c.oid, 'pg_class') FROM pg_class c WHERE c.relkind = 'i' "
               "AND c.relname LIKE :like AND c.relnamespace = 'public'::regnamespace ORDER BY 1")
    like = CATEGORY_INDEX_PREFIX.format(dims=check_dims(dims)).replace("_", r"\_") + "%"
    if isinstance(bind, Engine):
        with bind.connect() as conn:
            return sorted(c for c in conn.execute(sql, {"like": like}).scalars() if c)
    return sorted(c for c in bind.execute(sql, {"like": like}).scalars() if c)
