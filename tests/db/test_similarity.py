"""The catalog SQL interface: tenant isolation, k-completeness under filters, hostile inputs, plans, views.

Rows are seeded as the superuser test connection; the catalog is then queried as analysts query
it, as ``enrich_reader`` under forced row-level security: the functions take the tenant as an
argument, the views read the caller's ``enrich.tenant_id``.
"""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from db import similarity
from db.enums import EmbeddingKind
from tests.conftest import READER_ROLE, as_role, in_tenant
from tests.db.catalog_rows import (
    add_catalog,
    add_embeddings,
    add_listings,
    add_model_version,
    add_products,
    add_tenant,
    bulk_load,
    clustered,
    exact_nearest,
    unit_rows,
)

DIMS = 512


def test_similar_products_returns_nearest_of_same_tenant_only(db_session, models) -> None:  # noqa: ANN001
    rng = np.random.default_rng(1)
    vectors = unit_rows(rng, 200, DIMS)
    cats = ["dress" if n % 2 else "shirt" for n in range(200)]
    add_catalog(db_session, "acme", vectors, cats, vlm_id=models["vlm"], clip_id=models["clip"])
    # Tenant "rival" holds exact copies under the same external ids: nothing of it may leak.
    add_catalog(db_session, "rival", vectors, cats, vlm_id=models["vlm"], clip_id=models["clip"])

    with as_role(db_session, READER_ROLE):
        hits = similarity.similar_products(db_session, "acme", "p0", k=10)
        expected = [f"p{i}" for i in exact_nearest(vectors, vectors[0], 11) if i != 0][:10]
        assert [h.external_id for h in hits] == expected
        assert all(h.title.startswith("title p") for h in hits)
        assert [h.distance for h in hits] == sorted(h.distance for h in hits)

        same = similarity.similar_products(db_session, "acme", "p1", k=5, same_category=True)
        assert len(same) == 5 and {h.category for h in same} == {"dress"}

        found = similarity.search_by_embedding(db_session, "acme", vectors[3], k=3)
        assert found[0].external_id == "p3" and found[0].distance == pytest.approx(0.0, abs=1e-5)
        # The rival's own products are findable only under the rival tenant.
        rival_ids = {r for (r,) in db_session.execute(
            text("SELECT external_id FROM catalog.search_by_embedding('rival', CAST(:q AS vector), 50)"),
            {"q": vectors[3]})}
        acme_ids = {h.external_id for h in similarity.search_by_embedding(db_session, "acme", vectors[3], k=50)}
        assert len(rival_ids) == 50 and acme_ids == rival_ids  # same ids, but each from its own tenant
        with in_tenant(db_session, "acme", READER_ROLE):  # the join reads products: the reader's tenant
            product_tenants = {t for (t,) in db_session.execute(text(
                "SELECT DISTINCT p.tenant_id FROM catalog.search_by_embedding('acme', CAST(:q AS vector), 50) s "
                "JOIN products p ON p.external_id = s.external_id AND p.title = s.title "
                "AND p.tenant_id = 'acme'"),
                {"q": vectors[3]})}
        assert product_tenants == {"acme"}
        # Without a tenant of its own the reader sees no row of the tables (forced row-level security);
        # only the functions, which scope themselves to the tenant they are given, find products.
        assert db_session.execute(text("SELECT count(*) FROM embeddings")).scalar_one() == 0
        with pytest.raises(similarity.ProductNotFound):
            similarity.similar_products(db_session, "nobody", "p0")


def test_tenant_scoping_when_other_tenant_is_nearest(db_session, models) -> None:  # noqa: ANN001
    rng = np.random.default_rng(2)
    mine = unit_rows(rng, 30, DIMS)
    add_catalog(db_session, "acme", mine, ["dress"] * 30, vlm_id=models["vlm"], clip_id=models["clip"])
    theirs = np.repeat(mine[:1], 300, axis=0)  # 300 rows at distance 0 from the query, another tenant
    add_catalog(db_session, "rival", theirs, ["dress"] * 300, vlm_id=models["vlm"], clip_id=models["clip"],
                prefix="r")
    with as_role(db_session, READER_ROLE):
        hits = similarity.similar_products(db_session, "acme", "p0", k=10)
    assert len(hits) == 10 and not any(h.external_id.startswith("r") for h in hits)


def test_rare_category_still_gets_k_rows(db_session, models) -> None:  # noqa: ANN001
    """1% category: a plain HNSW scan + filter comes back short, the catalog function returns k."""
    rng = np.random.default_rng(3)
    n, k = 2000, 10
    centres = unit_rows(rng, 8, DIMS)
    assign = np.where(np.arange(n) % 100 == 0, 7, rng.integers(0, 7, n))  # cluster 7 = the rare category
    vectors, _ = clustered(rng, n, DIMS, centres, assign=assign)
    cats = np.where(assign == 7, "scarf", "dress").tolist()
    with bulk_load(db_session):
        add_catalog(db_session, "acme", vectors, cats, vlm_id=models["vlm"], clip_id=models["clip"])
    query = vectors[1]  # a dress: the scarves are far from it in the graph
    mask = np.array(cats) == "scarf"
    assert mask.sum() == 20

    # Both runs go through the HNSW index (not an exact scan + sort, which small tables would get).
    for setting in ("enable_seqscan", "enable_bitmapscan", "enable_sort"):
        db_session.execute(text(f"SET LOCAL {setting} = off"))
    db_session.execute(text("SET LOCAL hnsw.iterative_scan = off"))
    plain_sql = (
        f"SELECT id FROM embeddings WHERE dims = {DIMS} AND model_version_id = :v AND tenant_id = 'acme' "
        f"AND category = 'scarf' ORDER BY image_embedding::vector({DIMS}) <=> CAST(:q AS vector({DIMS})) "
        f"LIMIT {k}")
    with in_tenant(db_session, "acme", READER_ROLE):  # an analyst's own query of the table: its tenant
        params = {"v": models["clip"], "q": query}
        plan = "\n".join(r[0] for r in db_session.execute(text("EXPLAIN " + plain_sql), params))
        assert f"ix_embeddings_image_embedding_{DIMS}_hnsw" in plan, plan
        plain = db_session.execute(text(plain_sql), params).all()
        assert len(plain) < k, "the data set is too easy: plain HNSW + filter already returns k rows"

    with as_role(db_session, READER_ROLE):
        hits = similarity.search_by_embedding(db_session, "acme", query, k=k, category="scarf")
        plan = similarity.explain_search(db_session, "acme", query, k=k, category="scarf")
        assert f"ix_embeddings_image_embedding_{DIMS}_hnsw" in plan, plan
        assert len(hits) == k
        assert {h.external_id for h in hits} == {f"p{i}" for i in exact_nearest(vectors, query, k, mask)}
        same = similarity.similar_products(db_session, "acme", "p100", k=k, same_category=True)
        assert len(same) == k and {h.category for h in same} == {"scarf"}


def test_explain_shows_hnsw_index(db_session, models) -> None:  # noqa: ANN001
    rng = np.random.default_rng(4)
    vectors = unit_rows(rng, 1500, DIMS)
    with bulk_load(db_session):
        add_catalog(db_session, "acme", vectors, ["dress"] * 1500, vlm_id=models["vlm"], clip_id=models["clip"])
    with as_role(db_session, READER_ROLE):
        plan = similarity.explain_search(db_session, "acme", vectors[0], k=10)
        assert f"ix_embeddings_image_embedding_{DIMS}_hnsw" in plan, plan
        plan_text = similarity.explain_search(db_session, "acme", vectors[0], k=10, category="dress",
                                              target=EmbeddingKind.text)
        assert f"ix_embeddings_text_embedding_{DIMS}_hnsw" in plan_text, plan_text


def test_hostile_inputs(db_session, models) -> None:  # noqa: ANN001
    rng = np.random.default_rng(5)
    vectors = unit_rows(rng, 40, DIMS)
    add_catalog(db_session, "acme", vectors, ["dress"] * 40, vlm_id=models["vlm"], clip_id=models["clip"])

    with as_role(db_session, READER_ROLE):
        with pytest.raises(similarity.InvalidSearchArgument, match="has 3 dimensions") as wrong:
            similarity.search_by_embedding(db_session, "acme", [0.1, 0.2, 0.3])
        assert wrong.value.sqlstate == "22023"
        with pytest.raises(similarity.ProductNotFound, match="not found") as missing:
            similarity.similar_products(db_session, "acme", "no-such-product")
        assert missing.value.sqlstate == "P0002"
        for k in (0, -1, 100_000):
            with pytest.raises(similarity.InvalidSearchArgument, match="k must be"):
                similarity.similar_products(db_session, "acme", "p0", k=k)
        with pytest.raises(DBAPIError, match="target must be") as bad_target, db_session.begin_nested():
            db_session.execute(text("SELECT * FROM catalog.search_by_embedding('acme', CAST(:q AS vector), 5, "
                                    "NULL, 'image_embedding; DROP TABLE embeddings; --')"), {"q": vectors[0]})
        assert bad_target.value.orig.sqlstate == "22023"

        for hostile in ("dress' OR '1'='1", "dress'; DROP TABLE embeddings; --", "%", "dress\\",
                        "' OR tenant_id <> '"):
            assert similarity.search_by_embedding(db_session, "acme", vectors[0], category=hostile) == []
        assert similarity.search_by_embedding(db_session, "' OR '1'='1", vectors[0]) == []
        assert similarity.search_by_embedding(db_session, "acme", vectors[0], k=3, category="dress")  # still works
        with as_role(db_session, None):  # the superuser counts every row, whatever RLS shows the reader
            assert db_session.execute(text("SELECT count(*) FROM embeddings")).scalar_one() == 40
        # The session stays usable after a refused call (each call runs in a savepoint).
        with pytest.raises(similarity.InvalidSearchArgument):
            similarity.search_by_embedding(db_session, "acme", np.zeros(DIMS + 1))
        assert len(similarity.similar_products(db_session, "acme", "p0", k=2)) == 2


def test_no_active_model_is_a_clear_error(db_session, models) -> None:  # noqa: ANN001
    db_session.execute(text("UPDATE model_versions SET status = 'retired' WHERE kind = 'clip'"))
    with as_role(db_session, READER_ROLE):
        assert similarity.active_embedding_model(db_session) is None
        with pytest.raises(similarity.NoActiveEmbeddingModel) as exc:
            similarity.search_by_embedding(db_session, "acme", np.ones(DIMS))
        assert exc.value.sqlstate == "55000"


def test_product_not_yet_embedded_returns_no_rows(db_session, models) -> None:  # noqa: ANN001
    add_tenant(db_session, "acme")
    add_products(db_session, "acme", ["fresh"], ["dress"])
    with as_role(db_session, READER_ROLE):
        assert similarity.similar_products(db_session, "acme", "fresh") == []


def test_one_row_per_product_from_its_newest_version(db_session, models) -> None:  # noqa: ANN001
    rng = np.random.default_rng(6)
    vectors = unit_rows(rng, 20, DIMS)
    pids = add_catalog(db_session, "acme", vectors, ["dress"] * 20, vlm_id=models["vlm"], clip_id=models["clip"])
    # p5 moves to version 2 with an image that now sits next to p0; its v1 row stays (history).
    add_products(db_session, "acme", ["p5"], ["dress"], version=2)
    lid = add_listings(db_session, "acme", [pids[5]], ["dress"], vlm_id=models["vlm"], version=2)
    moved = vectors[0] + 0.05 * vectors[1]
    add_embeddings(db_session, "acme", [pids[5]], lid, ["dress"], (moved / np.linalg.norm(moved))[None, :],
                   clip_id=models["clip"])
    with as_role(db_session, READER_ROLE):
        hits = similarity.search_by_embedding(db_session, "acme", vectors[5], k=20)
        assert [h.external_id for h in hits].count("p5") == 1
        assert next(h for h in hits if h.external_id == "p5").distance > 0.5  # v1's exact match is ignored
        assert similarity.similar_products(db_session, "acme", "p0", k=1)[0].external_id == "p5"


def test_search_by_text_embeds_then_searches(db_session, models) -> None:  # noqa: ANN001
    rng = np.random.default_rng(7)
    vectors = unit_rows(rng, 30, DIMS)
    add_catalog(db_session, "acme", vectors, ["dress"] * 30, vlm_id=models["vlm"], clip_id=models["clip"])
    with as_role(db_session, READER_ROLE):
        hits = similarity.search_by_text(db_session, "acme", "red dress", lambda _t: vectors[7], k=1)
    assert hits[0].external_id == "p7"


def test_views(db_session, models) -> None:  # noqa: ANN001
    rng = np.random.default_rng(8)
    pids = add_catalog(db_session, "acme", unit_rows(rng, 3, DIMS), ["dress"] * 3, vlm_id=models["vlm"],
                       clip_id=models["clip"])
    vlm2 = add_model_version(db_session, "vlm", "tiny-vlm-2", status="candidate")
    newer = add_listings(db_session, "acme", [pids[0]], ["dress"], vlm_id=vlm2)[0]
    accepted = db_session.execute(text("SELECT id FROM listings WHERE product_id = :p AND id <> :n"),
                                  {"p": pids[0], "n": newer}).scalar_one()
    db_session.execute(text("UPDATE listings SET status = 'accepted' WHERE id = :id"), {"id": accepted})
    db_session.execute(text("UPDATE listings SET status = 'rejected' WHERE product_id = :p"), {"p": pids[1]})
    with in_tenant(db_session, "acme", READER_ROLE):  # an analyst: SET enrich.tenant_id, then the views
        current = dict(db_session.execute(text(
            "SELECT external_id, listing_id FROM catalog.current_listings WHERE tenant_id = 'acme'")).all())
        assert current["p0"] == accepted and "p1" not in current and "p2" in current

        status = dict(db_session.execute(text(
            "SELECT external_id, state FROM catalog.enrichment_status WHERE tenant_id = 'acme'")).all())
        assert status == {"p0": "complete", "p1": "complete", "p2": "complete"}

    image_ids = db_session.execute(text("SELECT image_id FROM listings WHERE product_id = ANY(:p) ORDER BY id"),
                                   {"p": pids}).scalars().all()
    group = db_session.execute(text("INSERT INTO duplicate_groups (tenant_id, representative_image_id) "
                                    "VALUES ('acme', :i) RETURNING id"), {"i": image_ids[0]}).scalar_one()
    for image_id, method in ((image_ids[0], "exact"), (image_ids[1], "near")):
        db_session.execute(text("INSERT INTO duplicate_members (group_id, image_id, tenant_id, method) "
                                "VALUES (:g, :i, 'acme', :m)"), {"g": group, "i": image_id, "m": method})
    db_session.execute(text("INSERT INTO product_images (tenant_id, product_id, product_version, position, "
                            "image_id, source_url) VALUES ('acme', :p, 1, 0, :i, 'https://x/1.jpg')"),
                       {"p": pids[1], "i": image_ids[1]})
    with in_tenant(db_session, "acme", READER_ROLE):
        row = db_session.execute(text("SELECT member_count, members FROM catalog.duplicate_groups "
                                      "WHERE tenant_id = 'acme' AND group_id = :g"), {"g": group}).one()
    assert row.member_count == 2
    assert [m["method"] for m in row.members] == ["exact", "near"] and row.members[1]["products"] == ["p1"]
