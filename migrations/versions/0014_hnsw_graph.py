"""embedding HNSW indexes built with m 24, ef_construction 128 (issue 16, recall at a million rows)

pgvector's default graph (m 16, ef_construction 64), which migration 0001 and every later size's
indexes were built with, tops out at recall@10 0.942 at 1M x 512 (ef_search 800, p95 20 ms on two
cores). m 24 / ef_construction 128 reaches 0.959 at ef_search 100 (p50 2.5 ms, p95 12.3 ms) in the
same pages on disk, for about three times the build time (infra/bench/bench_similarity.py
--m 24 --ef-construction 128). ``db.vector_indexes.DEFAULT_GRAPH`` and the settings
``ENRICH_DB__HNSW_M`` / ``ENRICH_DB__HNSW_EF_CONSTRUCTION`` hold the same values for every index
built from now on.

This migration gives the existing per-size indexes (``ix_embeddings_<column>_<dims>_hnsw``) the new
options and rebuilds them, but only while the table is small (at most ``REBUILD_MAX_ROWS``
embeddings; ``ENRICH_MIGRATE_REINDEX_MAX_ROWS`` changes the limit): a plain ``REINDEX`` locks out
writes, and at a million rows it runs for a quarter of an hour. A larger table keeps its indexes as they are, and the migration says so: the operator runs
``enrich embeddings reindex``, which rebuilds them ``CONCURRENTLY`` (built beside, then swapped).
The graph is a physical property, so searches give correct results either way; only recall at a
given ef_search differs. Downgrade resets the options to pgvector's defaults under the same rule.

Revision ID: 0014
Revises: 0013
"""

import logging
import os

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

M, EF_CONSTRUCTION = 24, 128
REBUILD_MAX_ROWS = 10_000  # ENRICH_MIGRATE_REINDEX_MAX_ROWS overrides it (tests; an operator with a maintenance window)
log = logging.getLogger("alembic.runtime.migration")


def _size_indexes(conn: sa.Connection) -> list[str]:
    return list(conn.execute(sa.text(
        "SELECT c.relname FROM pg_class c WHERE c.relkind = 'i' AND c.relnamespace = 'public'::regnamespace "
        "AND c.relname ~ '^ix_embeddings_(image|text)_embedding_[0-9]+_hnsw$' ORDER BY 1")).scalars())


def _rebuild_max_rows() -> int:
    return int(os.environ.get("ENRICH_MIGRATE_REINDEX_MAX_ROWS", REBUILD_MAX_ROWS))


def _small(conn: sa.Connection) -> bool:
    most = _rebuild_max_rows()
    rows = conn.execute(sa.text(f"SELECT count(*) FROM (SELECT 1 FROM embeddings LIMIT {most + 1}) s"))
    return rows.scalar_one() <= most


def _apply(options: str, what: str) -> None:
    conn = op.get_bind()
    names = _size_indexes(conn)
    if not names:
        return
    if not _small(conn):
        log.warning("embeddings holds more than %d rows: %s left as built; run `enrich embeddings reindex` to "
                    "rebuild them CONCURRENTLY with %s", _rebuild_max_rows(), ", ".join(names), what)
        return
    for name in names:
        op.execute(f"ALTER INDEX {name} {options}")
        op.execute(f"REINDEX INDEX {name}")


def upgrade() -> None:
    _apply(f"SET (m = {M}, ef_construction = {EF_CONSTRUCTION})", f"m={M}, ef_construction={EF_CONSTRUCTION}")


def downgrade() -> None:
    _apply("RESET (m, ef_construction)", "pgvector's default graph")
