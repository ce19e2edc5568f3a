"""Migration 0013's search path: the static per-size statement, its exact fallback (k-complete),
one row per product, the per-call fallback when a size has no function, and per-category indexes.

Rows are seeded as the superuser; searches run as ``enrich_reader`` (and ``enrich_worker``) under
forced row-level security, as analysts and workers run them. Where a test changes a function's
settings or drops one, it does so as the superuser inside the test's transaction (rolled back).
"""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import text

from db import embedding_versions as ev
from db import similarity, vector_indexes
from tests.conftest import ADMIN_ROLE, READER_ROLE, WORKER_ROLE, as_role, in_system_scope, in_tenant
from tests.db.catalog_rows import (
    add_catalog,
    add_embeddings,
    add_listings,
    add_model_version,
    bulk_load,
    clustered,
    exact_nearest,
    unit_rows,
)

DIMS = 512
K = 10
NEAREST = "catalog_impl.nearest_512(text, vector, integer, text, bigint, integer, text)"


def _starve_graph_walk(session) -> None:  # noqa: ANN001
    """The HNSW path returns only its first candidate list (no iterative top-up), as a search that
    hits ``hnsw.max_scan_tuples`` on a big table would: what is missing must come from the exact scan."""
    with as_role(session, None):
        session.execute(text(f"ALTER FUNCTION {NEAREST} SET hnsw.max_scan_tuples = 1"))
        session.execute(text(f"ALTER FUNCTION {NEAREST} SET hnsw.iterative_scan = off"))


def test_the_size_has_a_static_search_function_and_the_dispatch_calls_it(db_session, models) -> None:  # noqa: ANN001
    assert vector_indexes.has_search_function(db_session, DIMS)
    dispatch = db_session.execute(text(
        "SELECT prosrc FROM pg_proc WHERE oid = 'catalog_impl._nearest(text, vector, integer, text, text, bigint)'"
        "::regprocedure")).scalar_one()
    assert "catalog_impl.nearest_512(" in dispatch
    settings = db_session.execute(text(f"SELECT proconfig FROM pg_proc WHERE oid = '{NEAREST}'::regprocedure")
                                  ).scalar_one()
    assert "plan_cache_mode=force_generic_plan" in settings and "hnsw.iterative_scan=relaxed_order" in settings


def test_small_tenant_beside_a_big_one_is_k_complete_and_isolated(db_session, models) -> None:  # noqa: ANN001
    """The unfiltered (static) path: a tenant of 12 products in a table of 2000 rows of another
    tenant that sit nearer the query; the graph walk is starved, the exact scan completes it."""
    rng = np.random.default_rng(21)
    centres = unit_rows(rng, 2, DIMS)
    big, _ = clustered(rng, 2000, DIMS, centres, assign=np.zeros(2000, dtype=int))
    small, _ = clustered(rng, 12, DIMS, centres, assign=np.ones(12, dtype=int))
    with bulk_load(db_session):
        add_catalog(db_session, "rival", big, ["dress"] * 2000, vlm_id=models["vlm"], clip_id=models["clip"],
                    prefix="r")
        add_catalog(db_session, "acme", small, ["dress"] * 12, vlm_id=models["vlm"], clip_id=models["clip"])
    _starve_graph_walk(db_session)
    query = big[0]  # nearest to the rival's rows, far from acme's
    for role in (READER_ROLE, WORKER_ROLE):
        with as_role(db_session, role):
            hits = similarity.search_by_embedding(db_session, "acme", query, k=K)
            assert [h.external_id for h in hits] == [f"p{i}" for i in exact_nearest(small, query, K)]
            everything = similarity.search_by_embedding(db_session, "acme", query, k=50)
            assert len(everything) == 12 and all(h.external_id.startswith("p") for h in everything)
            assert len(similarity.similar_products(db_session, "acme", "p0", k=K)) == K
    # The worker in another tenant's transaction still gets only the tenant it names.
    with in_tenant(db_session, "rival", WORKER_ROLE):
        assert {h.external_id[0] for h in similarity.search_by_embedding(db_session, "acme", query, k=50)} == {"p"}


def test_filtered_search_falls_back_to_exact_when_the_walk_comes_back_short(db_session, models) -> None:  # noqa: ANN001
    rng = np.random.default_rng(22)
    n = 2000
    centres = unit_rows(rng, 8, DIMS)
    assign = np.where(np.arange(n) % 100 == 0, 7, rng.integers(0, 7, n))
    vectors, _ = clustered(rng, n, DIMS, centres, assign=assign)
    cats = np.where(assign == 7, "scarf", "dress").tolist()
    with bulk_load(db_session):
        add_catalog(db_session, "acme", vectors, cats, vlm_id=models["vlm"], clip_id=models["clip"])
    _starve_graph_walk(db_session)
    for setting in ("enable_seqscan", "enable_bitmapscan", "enable_sort"):  # the planner takes the HNSW path
        db_session.execute(text(f"SET LOCAL {setting} = off"))
    mask = np.array(cats) == "scarf"
    query = vectors[1]
    with as_role(db_session, READER_ROLE):
        plan = similarity.explain_search(db_session, "acme", query, k=K, category="scarf")
        assert f"ix_embeddings_image_embedding_{DIMS}_hnsw" in plan, plan
        hits = similarity.search_by_embedding(db_session, "acme", query, k=K, category="scarf")
        assert [h.external_id for h in hits] == [f"p{i}" for i in exact_nearest(vectors, query, K, mask)]
        same = similarity.similar_products(db_session, "acme", "p100", k=K, same_category=True)
        assert len(same) == K and {h.category for h in same} == {"scarf"}
        assert "p100" not in {h.external_id for h in same}


def test_one_row_per_product_when_one_version_has_two_listings(db_session, models) -> None:  # noqa: ANN001
    """Two listing-model versions listed the same product version: its current embedding is the
    newest listing's, and the product appears once."""
    rng = np.random.default_rng(23)
    vectors = unit_rows(rng, 30, DIMS)
    pids = add_catalog(db_session, "acme", vectors, ["dress"] * 30, vlm_id=models["vlm"], clip_id=models["clip"])
    vlm2 = add_model_version(db_session, "vlm", "tiny-vlm-2")
    lid = add_listings(db_session, "acme", [pids[4]], ["dress"], vlm_id=vlm2)
    moved = vectors[9] + 0.05 * vectors[4]
    add_embeddings(db_session, "acme", [pids[4]], lid, ["dress"], (moved / np.linalg.norm(moved))[None, :],
                   clip_id=models["clip"])
    with as_role(db_session, READER_ROLE):
        hits = similarity.search_by_embedding(db_session, "acme", vectors[4], k=30)
        assert [h.external_id for h in hits].count("p4") == 1 and len(hits) == 30
        assert next(h for h in hits if h.external_id == "p4").distance > 0.5  # the older listing's vector is not used
        assert similarity.similar_products(db_session, "acme", "p9", k=1)[0].external_id == "p4"


def test_a_size_without_its_function_is_searched_per_call_with_the_same_answer(db_session, models) -> None:  # noqa: ANN001
    rng = np.random.default_rng(24)
    vectors = unit_rows(rng, 300, DIMS)
    with bulk_load(db_session):
        add_catalog(db_session, "acme", vectors, ["dress"] * 300, vlm_id=models["vlm"], clip_id=models["clip"])
    with as_role(db_session, READER_ROLE):
        static = similarity.search_by_embedding(db_session, "acme", vectors[5], k=K)
    with as_role(db_session, None):
        db_session.execute(text("SELECT catalog_impl._drop_nearest(512)"))
    assert not vector_indexes.has_search_function(db_session, DIMS)
    with as_role(db_session, READER_ROLE):
        dynamic = similarity.search_by_embedding(db_session, "acme", vectors[5], k=K)
        assert dynamic == static and dynamic[0].external_id == "p5"
    with as_role(db_session, None):
        assert vector_indexes.ensure_dimension_index(db_session, DIMS) == []  # indexes exist: the function returns
    assert vector_indexes.has_search_function(db_session, DIMS)


def test_k_above_the_static_limit_and_text_target(db_session, models) -> None:  # noqa: ANN001
    rng = np.random.default_rng(25)
    vectors = unit_rows(rng, 200, DIMS)
    texts = unit_rows(rng, 200, DIMS)
    pids = add_catalog(db_session, "acme", vectors, ["dress"] * 200, vlm_id=models["vlm"], clip_id=models["clip"])
    db_session.execute(text("UPDATE embeddings e SET text_embedding = CAST(t.v AS vector) FROM unnest("
                            "CAST(:pids AS bigint[]), CAST(:vs AS text[])) AS t(pid, v) WHERE e.product_id = t.pid"),
                       {"pids": pids, "vs": ["[" + ",".join(f"{x:.6g}" for x in v) + "]" for v in texts]})
    with as_role(db_session, READER_ROLE):
        wide = similarity.search_by_embedding(db_session, "acme", vectors[3], k=60)
        assert [h.external_id for h in wide] == [f"p{i}" for i in exact_nearest(vectors, vectors[3], 60)]
        by_text = similarity.search_by_embedding(db_session, "acme", texts[8], k=3, target="text")
        assert [h.external_id for h in by_text] == [f"p{i}" for i in exact_nearest(texts, texts[8], 3)]


def test_per_category_indexes_are_used_by_filtered_searches(db_session, models) -> None:  # noqa: ANN001
    rng = np.random.default_rng(26)
    n = 1500
    centres = unit_rows(rng, 3, DIMS)
    assign = rng.integers(0, 3, n)
    vectors, _ = clustered(rng, n, DIMS, centres, assign=assign)
    names = np.array(["dress", "shirt", "it's a hat"])  # a quote in a category name stays a literal
    cats = names[assign].tolist()
    with bulk_load(db_session):
        add_catalog(db_session, "acme", vectors, cats, vlm_id=models["vlm"], clip_id=models["clip"])
    with in_system_scope(db_session, ADMIN_ROLE):  # what `enrich embeddings index-categories` reads
        counts = ev.category_counts(db_session, models["clip"])
    assert counts == {name: cats.count(name) for name in set(cats)}
    with as_role(db_session, None):
        created = vector_indexes.ensure_category_indexes(db_session, DIMS, counts)
        assert len(created) == 3 and vector_indexes.ensure_category_indexes(db_session, DIMS, cats) == []
        assert vector_indexes.indexed_categories(db_session, DIMS) == sorted(names.tolist())
        db_session.execute(text("ANALYZE embeddings"))
        # At this size the planner prefers an exact scan of the category (at 20k rows and up it takes
        # the category's own graph, see infra/bench/bench_similarity.py --grouped): with the global
        # graph and the exact paths out of its reach, the plan shows that the quoted predicate matches
        # and that the per-call plan of a filtered search uses the category's index.
        db_session.execute(text(f"DROP INDEX ix_embeddings_image_embedding_{DIMS}_hnsw"))
    for setting in ("enable_seqscan", "enable_bitmapscan", "enable_sort"):  # and not the exact scan of 500 rows
        db_session.execute(text(f"SET LOCAL {setting} = off"))
    hat_index = vector_indexes.category_index_name(DIMS, "it's a hat")
    mask = np.array(cats) == "it's a hat"
    query = vectors[int(np.flatnonzero(assign == 0)[0])]  # a dress, searching among hats
    with as_role(db_session, READER_ROLE):
        plan = similarity.explain_search(db_session, "acme", query, k=K, category="it's a hat")
        assert hat_index in plan, [line.strip()[:120] for line in plan.splitlines() if "Scan" in line]
        hits = similarity.search_by_embedding(db_session, "acme", query, k=K, category="it's a hat")
        exact = {f"p{i}" for i in exact_nearest(vectors, query, K, mask)}
        assert len(hits) == K and {h.category for h in hits} == {"it's a hat"}
        assert len({h.external_id for h in hits} & exact) >= 8  # approximate, but from the hat graph
        unfiltered = similarity.explain_search(db_session, "acme", query, k=K)
        assert "_cat_" not in unfiltered  # a partial index of one category never answers an unfiltered search
        assert len(similarity.search_by_embedding(db_session, "acme", query, k=K)) == K
    with as_role(db_session, None):
        dropped = vector_indexes.drop_dimension_index(db_session, DIMS)
        assert hat_index in dropped and vector_indexes.category_index_names(db_session, DIMS) == []
        assert vector_indexes.indexed_categories(db_session, DIMS) == []
        assert not vector_indexes.has_search_function(db_session, DIMS)


def test_category_index_names_refuse_bad_input() -> None:
    for bad in ("", "x" * 65, None):
        with pytest.raises(ValueError, match="category must be"):
            vector_indexes.category_index_name(DIMS, bad)  # type: ignore[arg-type]
    with pytest.raises(vector_indexes.DimensionError):
        vector_indexes.category_index_name(0, "dress")


def test_halfvec_indexes_serve_the_same_searches(db_session, models) -> None:  # noqa: ANN001
    rng = np.random.default_rng(27)
    centres = unit_rows(rng, 4, DIMS)
    vectors, assign = clustered(rng, 1200, DIMS, centres)
    cats = np.where(assign == 3, "scarf", "dress").tolist()
    with bulk_load(db_session):
        add_catalog(db_session, "acme", vectors, cats, vlm_id=models["vlm"], clip_id=models["clip"])
    with as_role(db_session, READER_ROLE):
        before = similarity.search_by_embedding(db_session, "acme", vectors[7], k=K)
    with as_role(db_session, None):
        assert vector_indexes.index_precision(db_session, DIMS) == "vector"
        assert vector_indexes.ensure_dimension_index(db_session, DIMS, "halfvec") == vector_indexes.index_names(DIMS)
        assert vector_indexes.ensure_dimension_index(db_session, DIMS, "halfvec") == []  # idempotent
        assert vector_indexes.index_precision(db_session, DIMS) == "halfvec"
        db_session.execute(text("ANALYZE embeddings"))
        with pytest.raises(vector_indexes.DimensionError, match="precision"):
            vector_indexes.ensure_dimension_index(db_session, DIMS, "float16")
    source = db_session.execute(text(f"SELECT prosrc FROM pg_proc WHERE oid = '{NEAREST}'::regprocedure")).scalar_one()
    assert f"::halfvec({DIMS})" in source
    with as_role(db_session, READER_ROLE):
        plan = similarity.explain_search(db_session, "acme", vectors[7], k=K)
        assert f"ix_embeddings_image_embedding_{DIMS}_hnsw" in plan and "halfvec" in plan
        after = similarity.search_by_embedding(db_session, "acme", vectors[7], k=K)
        assert [h.external_id for h in after] == [h.external_id for h in before]
        assert [h.distance for h in after] == pytest.approx([h.distance for h in before], abs=1e-6)  # float32
        scarves = similarity.search_by_embedding(db_session, "acme", vectors[7], k=K, category="scarf")
        mask = np.array(cats) == "scarf"
        assert len(scarves) == K and {h.category for h in scarves} == {"scarf"}
        assert len({h.external_id for h in scarves} & {f"p{i}" for i in exact_nearest(vectors, vectors[7], K, mask)}) >= 8
    with as_role(db_session, None):
        assert vector_indexes.ensure_dimension_index(db_session, DIMS) == vector_indexes.index_names(DIMS)
        assert vector_indexes.index_precision(db_session, DIMS) == "vector"
