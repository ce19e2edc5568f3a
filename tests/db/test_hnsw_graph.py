"""The embedding indexes' HNSW graph (m, ef_construction): migration 0014, ``ensure_dimension_index``.

Migration 0014 rebuilds the existing per-size indexes with m 24 / ef_construction 128 while the table
is small and leaves a large one for ``enrich embeddings reindex`` (``REINDEX CONCURRENTLY``: built
beside, swapped, searches keep an index). The graph is read back from the index's reloptions.
"""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from db import migrate, vector_indexes
from db.vector_indexes import DEFAULT_GRAPH, PGVECTOR_DEFAULT_GRAPH, DimensionError, HnswGraph
from tests.db.catalog_rows import add_catalog, add_model_version, unit_rows

NAMES = vector_indexes.index_names(512)


def _graphs(bind) -> list[HnswGraph | None]:  # noqa: ANN001
    return [vector_indexes.index_graph(bind, name) for name in NAMES]


def test_0014_rebuilds_a_small_tables_indexes_up_and_down(scratch_engine) -> None:  # noqa: ANN001
    eng = scratch_engine("migration_0014")
    migrate.upgrade(eng, "0013")
    assert _graphs(eng) == [PGVECTOR_DEFAULT_GRAPH] * 2  # 0001 built them without options
    migrate.upgrade(eng, "0014")
    assert _graphs(eng) == [DEFAULT_GRAPH] * 2
    assert vector_indexes.has_dimension_index(eng, 512)
    assert vector_indexes.ensure_dimension_index(eng, 512) == []  # what the settings' default asks for already
    migrate.downgrade(eng, "0013")
    assert _graphs(eng) == [PGVECTOR_DEFAULT_GRAPH] * 2
    migrate.upgrade(eng, "0014")
    assert _graphs(eng) == [DEFAULT_GRAPH] * 2


def test_0014_leaves_a_large_table_to_a_concurrent_reindex(scratch_engine, monkeypatch) -> None:  # noqa: ANN001
    """Above the row limit the migration changes nothing; the CONCURRENTLY rebuild then brings the
    indexes to the graph, and the rows are found through the rebuilt index."""
    monkeypatch.setenv("ENRICH_MIGRATE_REINDEX_MAX_ROWS", "3")
    eng = scratch_engine("migration_0014_large")
    migrate.upgrade(eng, "0013")
    vectors = unit_rows(np.random.default_rng(3), 5, 512)
    with Session(eng) as session:
        vlm, clip = add_model_version(session, "vlm", "v"), add_model_version(session, "clip", "c", dims=512)
        pids = add_catalog(session, "t1", vectors, ["shirt"] * 5, vlm_id=vlm, clip_id=clip)
        session.commit()
    migrate.upgrade(eng, "0014")
    assert _graphs(eng) == [PGVECTOR_DEFAULT_GRAPH] * 2  # 5 rows > 3: left for the operator

    assert vector_indexes.ensure_dimension_index(eng, 512) == NAMES  # an Engine: REINDEX CONCURRENTLY
    assert _graphs(eng) == [DEFAULT_GRAPH] * 2
    assert vector_indexes.has_dimension_index(eng, 512)
    with eng.connect() as conn:
        leftovers = conn.execute(text("SELECT count(*) FROM pg_class WHERE relname LIKE '%ccnew%'")).scalar_one()
        conn.execute(text("SET enable_seqscan = off"))
        plan = "\n".join(conn.execute(text(
            "EXPLAIN SELECT product_id FROM embeddings WHERE dims = 512 "
            "ORDER BY image_embedding::vector(512) <=> CAST(:q AS vector(512)) LIMIT 1"),
            {"q": "[" + ",".join(map(str, vectors[2])) + "]"}).scalars())
        nearest = conn.execute(text(
            "SELECT product_id FROM embeddings WHERE dims = 512 "
            "ORDER BY image_embedding::vector(512) <=> CAST(:q AS vector(512)) LIMIT 1"),
            {"q": "[" + ",".join(map(str, vectors[2])) + "]"}).scalar_one()
    assert leftovers == 0
    assert NAMES[0] in plan
    assert nearest == pids[2]
    assert vector_indexes.ensure_dimension_index(eng, 512) == []  # the second run is idle


def test_another_graph_is_rebuilt_in_the_callers_transaction(db_session) -> None:  # noqa: ANN001
    assert _graphs(db_session) == [DEFAULT_GRAPH] * 2
    other = HnswGraph(16, 64)
    assert vector_indexes.ensure_dimension_index(db_session, 512, graph=other) == NAMES
    assert _graphs(db_session) == [other] * 2
    assert vector_indexes.ensure_dimension_index(db_session, 512, graph=other) == []
    assert vector_indexes.has_search_function(db_session, 512)  # the size keeps its static search


def test_a_new_size_is_built_with_the_graph_it_is_given(db_session) -> None:  # noqa: ANN001
    graph = HnswGraph(8, 32)
    created = vector_indexes.ensure_dimension_index(db_session, 24, graph=graph)
    assert created == vector_indexes.index_names(24)
    assert [vector_indexes.index_graph(db_session, n) for n in created] == [graph] * 2


@pytest.mark.parametrize(("m", "ef", "message"), [
    (1, 64, "m must be an integer in 2..100"),
    (101, 400, "m must be an integer in 2..100"),
    (24, 40, "at least 2 \\* m \\(48\\)"),
    (16, 1001, "in 4..1000"),
])
def test_an_unbuildable_graph_is_refused(m: int, ef: int, message: str) -> None:
    with pytest.raises(DimensionError, match=message):
        HnswGraph(m, ef)
