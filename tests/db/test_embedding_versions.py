"""Blue/green embedding versions: backfill beside the active one, compare, activate, drop."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from db import embedding_versions as ev
from db import vector_indexes
from db import similarity
from tests.db.catalog_rows import add_catalog, add_model_version, unit_rows

OLD_DIMS, NEW_DIMS = 512, 256


class ProjectingEmbedder:
    """Deterministic fake 'new model': a fixed random projection of the old vectors (neighbours survive)."""

    def __init__(self, old: dict[int, np.ndarray], dims: int) -> None:
        self.old = old
        self.matrix = np.random.default_rng(99).standard_normal((OLD_DIMS, dims)).astype(np.float32)
        self.calls = 0

    def __call__(self, items: Sequence[ev.BackfillItem]) -> tuple[np.ndarray, np.ndarray]:
        self.calls += 1
        v = np.stack([self.old[it.product_id] for it in items]) @ self.matrix
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        return v, v


@pytest.fixture
def catalog(db_session) -> tuple[dict[str, int], np.ndarray, list[int]]:  # noqa: ANN001
    ids = {"vlm": add_model_version(db_session, "vlm", "vlm-a"),
           "clip": add_model_version(db_session, "clip", "clip-a", dims=OLD_DIMS)}
    vectors = unit_rows(np.random.default_rng(11), 120, OLD_DIMS)
    pids = add_catalog(db_session, "acme", vectors, ["dress"] * 120, vlm_id=ids["vlm"], clip_id=ids["clip"])
    return ids, vectors, pids


def _factory(session: Session):  # noqa: ANN202
    """Sessions on the test's connection: each unit-of-work commit releases a savepoint only."""
    conn = session.connection()
    return lambda: Session(bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False)


def test_backfill_activate_drop_cycle(db_session, catalog) -> None:  # noqa: ANN001
    ids, vectors, pids = catalog
    embedder = ProjectingEmbedder(dict(zip(pids, vectors, strict=True)), NEW_DIMS)
    new_id = ev.register_version(db_session, ev.VersionSpec("clip-b", "r1", NEW_DIMS, "tiny", True))
    assert ev.register_version(db_session, ev.VersionSpec("clip-b", "r1", NEW_DIMS, "tiny", True)) == new_id
    assert vector_indexes.ensure_dimension_index(db_session, NEW_DIMS) == vector_indexes.index_names(NEW_DIMS)
    assert vector_indexes.ensure_dimension_index(db_session, NEW_DIMS) == []  # idempotent

    progress: list[int] = []
    half = ev.run_backfill(_factory(db_session), new_id, embedder, batch_size=16, limit=60,
                           on_progress=lambda done, _start: progress.append(done))
    assert half.written == 60 and progress[-1] == 60 and half.coverage == ev.Coverage(120, 60)
    assert ev.get_version(db_session, new_id).status == "backfilling"

    # Mid-backfill, searches still read only the active (old) version.
    before = similarity.similar_products(db_session, "acme", "p0", k=5)
    exact_old = np.argsort(1 - vectors @ vectors[0])[1:6]
    assert [h.external_id for h in before] == [f"p{i}" for i in exact_old]
    with pytest.raises(similarity.InvalidSearchArgument, match="has 256 dimensions"):
        similarity.search_by_embedding(db_session, "acme", np.ones(NEW_DIMS))
    with pytest.raises(ev.VersionError, match="covers 60/120"):
        ev.activate(db_session, new_id)

    rest = ev.run_backfill(_factory(db_session), new_id, embedder, batch_size=16)  # resumes
    assert rest.written == 60 and rest.coverage.ratio == 1.0
    assert ev.run_backfill(_factory(db_session), new_id, embedder).written == 0
    assert db_session.execute(text("SELECT count(*) FROM embeddings WHERE model_version_id = :v"),
                              {"v": new_id}).scalar_one() == 120

    result = ev.compare(db_session, new_id, queries=20)
    assert result.coverage.ratio == 1.0 and result.recall_at_k is not None and result.recall_at_k >= 0.9
    assert ev.get_version(db_session, new_id).metrics["compare"]["recall_at_10"] == result.recall_at_k

    assert ev.activate(db_session, new_id) == ids["clip"]
    statuses = dict(db_session.execute(text("SELECT id, status FROM model_versions WHERE kind = 'clip'")).all())
    assert statuses == {ids["clip"]: "retired", new_id: "active"}
    query = embedder([ev.BackfillItem(0, "acme", pids[0], "dress", 0, "", None, "")])[0][0]
    after = similarity.search_by_embedding(db_session, "acme", query, k=3)
    assert after[0].external_id == "p0" and after[0].distance == pytest.approx(0, abs=1e-5)
    with pytest.raises(similarity.InvalidSearchArgument, match="has 512 dimensions"):
        similarity.search_by_embedding(db_session, "acme", vectors[0])
    db_session.execute(text("ANALYZE embeddings"))
    for setting in ("enable_seqscan", "enable_bitmapscan", "enable_sort"):  # 120 rows: force the index path
        db_session.execute(text(f"SET LOCAL {setting} = off"))
    assert "ix_embeddings_image_embedding_256_hnsw" in similarity.explain_search(db_session, "acme", query)

    with pytest.raises(ev.VersionError, match="is active"):
        ev.drop_version(db_session, new_id)
    deleted, index_unused = ev.drop_version(db_session, ids["clip"])
    assert deleted == 120 and index_unused
    assert vector_indexes.drop_dimension_index(db_session, OLD_DIMS) == vector_indexes.index_names(OLD_DIMS)
    assert not vector_indexes.has_dimension_index(db_session, OLD_DIMS) and vector_indexes.has_dimension_index(db_session, NEW_DIMS)
    assert db_session.execute(text("SELECT count(*) FROM embeddings WHERE model_version_id = :v"),
                              {"v": ids["clip"]}).scalar_one() == 0
    with pytest.raises(ev.VersionError, match="dropped"):
        ev.activate(db_session, ids["clip"])
    assert [v.status for v in ev.list_versions(db_session)] == ["retired", "active"]


def test_same_dims_version_keeps_shared_index_on_drop(db_session, catalog) -> None:  # noqa: ANN001
    ids, vectors, pids = catalog
    embedder = ProjectingEmbedder(dict(zip(pids, vectors, strict=True)), OLD_DIMS)
    new_id = ev.register_version(db_session, ev.VersionSpec("clip-a", "r2", OLD_DIMS, "tiny", True))
    ev.run_backfill(_factory(db_session), new_id, embedder, batch_size=50)
    ev.activate(db_session, new_id)
    # Both versions share the 512 index: with the old one retired the search returns each product once.
    hits = similarity.similar_products(db_session, "acme", "p0", k=10)
    assert len({h.external_id for h in hits}) == 10
    _, index_unused = ev.drop_version(db_session, ids["clip"])
    assert not index_unused


def test_activate_force_and_rate_limit(db_session, catalog) -> None:  # noqa: ANN001
    ids, vectors, pids = catalog
    embedder = ProjectingEmbedder(dict(zip(pids, vectors, strict=True)), NEW_DIMS)
    new_id = ev.register_version(db_session, ev.VersionSpec("clip-c", "r1", NEW_DIMS, "tiny", True))
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    report = ev.run_backfill(_factory(db_session), new_id, embedder, batch_size=10, limit=30,
                             max_rows_per_s=10.0, clock=lambda: now[0], sleep=sleep)
    assert report.written == 30 and sum(slept) == pytest.approx(3.0)  # 30 rows at 10 rows/s
    with pytest.raises(ev.VersionError, match="HNSW index|covers"):
        ev.activate(db_session, new_id)
    assert ev.activate(db_session, new_id, force=True) == ids["clip"]
    with pytest.raises(vector_indexes.DimensionError, match="integer in 1..2000"):
        vector_indexes.ensure_dimension_index(db_session, 4096)
