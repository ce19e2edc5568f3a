"""Blue/green embedding versions: backfill beside the active one, compare, activate, drop.

Run as the maintenance role ``enrich_admin`` under forced row-level security, as the ``enrich
backfill`` / ``enrich embeddings …`` commands do: steps that read every tenant run in
``admin_session`` (the system scope), ``run_backfill`` opens such transactions itself, and the
HNSW index DDL runs as the table owner (the test's superuser connection, ``as_role(s, None)``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence

import numpy as np
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from db import embedding_versions as ev
from db import similarity, vector_indexes
from db.engine import DatabaseUnavailable, admin_session, set_system_scope
from tests.conftest import ADMIN_ROLE, as_role
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
    """120 listings of tenant acme embedded by the active clip version, seeded as the superuser."""
    with as_role(db_session, None):
        ids = {"vlm": add_model_version(db_session, "vlm", "vlm-a"),
               "clip": add_model_version(db_session, "clip", "clip-a", dims=OLD_DIMS)}
        vectors = unit_rows(np.random.default_rng(11), 120, OLD_DIMS)
        pids = add_catalog(db_session, "acme", vectors, ["dress"] * 120, vlm_id=ids["vlm"], clip_id=ids["clip"])
    return ids, vectors, pids


def _factory(session: Session):  # noqa: ANN202
    """Sessions on the test's connection (and its role): each commit releases a savepoint only."""
    conn = session.connection()
    return lambda: Session(bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False)


def _clear_scope(session: Session) -> None:
    """A released savepoint keeps its SET LOCAL: drop the system scope a step left behind, so the
    next step proves it sets its own."""
    session.execute(text("SELECT set_config('enrich.scope', '', true)"))


def test_backfill_activate_drop_cycle(admin_db_session, catalog) -> None:  # noqa: ANN001
    db_session = admin_db_session
    ids, vectors, pids = catalog
    embedder = ProjectingEmbedder(dict(zip(pids, vectors, strict=True)), NEW_DIMS)
    with admin_session(_factory(db_session)) as s:
        new_id = ev.register_version(s, ev.VersionSpec("clip-b", "r1", NEW_DIMS, "tiny", True))
        assert ev.register_version(s, ev.VersionSpec("clip-b", "r1", NEW_DIMS, "tiny", True)) == new_id
    _clear_scope(db_session)
    with as_role(db_session, None):  # index DDL is the table owner's
        assert vector_indexes.ensure_dimension_index(db_session, NEW_DIMS) == vector_indexes.index_names(NEW_DIMS)
        assert vector_indexes.ensure_dimension_index(db_session, NEW_DIMS) == []  # idempotent
    assert db_session.execute(text("SELECT current_user")).scalar_one() == ADMIN_ROLE

    progress: list[int] = []
    half = ev.run_backfill(_factory(db_session), new_id, embedder, batch_size=16, limit=60,
                           on_progress=lambda done, _start: progress.append(done))
    assert half.written == 60 and progress[-1] == 60 and half.coverage == ev.Coverage(120, 60, 120)
    assert ev.get_version(db_session, new_id).status == "backfilling"
    _clear_scope(db_session)

    # Mid-backfill, searches still read only the active (old) version.
    before = similarity.similar_products(db_session, "acme", "p0", k=5)
    exact_old = np.argsort(1 - vectors @ vectors[0])[1:6]
    assert [h.external_id for h in before] == [f"p{i}" for i in exact_old]
    with pytest.raises(similarity.InvalidSearchArgument, match="has 256 dimensions"):
        similarity.search_by_embedding(db_session, "acme", np.ones(NEW_DIMS))
    with pytest.raises(ev.VersionError, match="covers 60/120"), admin_session(_factory(db_session)) as s:
        ev.activate(s, new_id)

    rest = ev.run_backfill(_factory(db_session), new_id, embedder, batch_size=16)  # resumes
    assert rest.written == 60 and rest.coverage.ratio == 1.0
    _clear_scope(db_session)
    assert ev.run_backfill(_factory(db_session), new_id, embedder).written == 0
    with admin_session(_factory(db_session)) as s:
        assert s.execute(text("SELECT count(*) FROM embeddings WHERE model_version_id = :v"),
                         {"v": new_id}).scalar_one() == 120
        result = ev.compare(s, new_id, queries=20)
        assert result.coverage.ratio == 1.0 and result.recall_at_k is not None and result.recall_at_k >= 0.9
        assert ev.get_version(s, new_id).metrics["compare"]["recall_at_10"] == result.recall_at_k

        assert ev.activate(s, new_id) == ids["clip"]
        statuses = dict(s.execute(text("SELECT id, status FROM model_versions WHERE kind = 'clip'")).all())
        assert statuses == {ids["clip"]: "retired", new_id: "active"}
    _clear_scope(db_session)
    query = embedder([ev.BackfillItem(0, "acme", pids[0], "dress", 0, "", None, "")])[0][0]
    after = similarity.search_by_embedding(db_session, "acme", query, k=3)
    assert after[0].external_id == "p0" and after[0].distance == pytest.approx(0, abs=1e-5)
    with pytest.raises(similarity.InvalidSearchArgument, match="has 512 dimensions"):
        similarity.search_by_embedding(db_session, "acme", vectors[0])
    with as_role(db_session, None):  # ANALYZE: the owner's
        db_session.execute(text("ANALYZE embeddings"))
    for setting in ("enable_seqscan", "enable_bitmapscan", "enable_sort"):  # 120 rows: force the index path
        db_session.execute(text(f"SET LOCAL {setting} = off"))
    assert "ix_embeddings_image_embedding_256_hnsw" in similarity.explain_search(db_session, "acme", query)

    with pytest.raises(ev.VersionError, match="is active"), admin_session(_factory(db_session)) as s:
        ev.drop_version(s, new_id)
    with admin_session(_factory(db_session)) as s:
        deleted, index_unused = ev.drop_version(s, ids["clip"])
    assert deleted == 120 and index_unused
    _clear_scope(db_session)
    with as_role(db_session, None):
        assert vector_indexes.drop_dimension_index(db_session, OLD_DIMS) == vector_indexes.index_names(OLD_DIMS)
    assert not vector_indexes.has_dimension_index(db_session, OLD_DIMS) and vector_indexes.has_dimension_index(db_session, NEW_DIMS)
    with admin_session(_factory(db_session)) as s:
        assert s.execute(text("SELECT count(*) FROM embeddings WHERE model_version_id = :v"),
                         {"v": ids["clip"]}).scalar_one() == 0
        with pytest.raises(ev.VersionError, match="dropped"):
            ev.activate(s, ids["clip"])
        assert [(v.status, v.rows) for v in ev.list_versions(s)] == [("retired", 0), ("active", 120)]


def test_same_dims_version_keeps_shared_index_on_drop(admin_db_session, catalog) -> None:  # noqa: ANN001
    db_session = admin_db_session
    ids, vectors, pids = catalog
    embedder = ProjectingEmbedder(dict(zip(pids, vectors, strict=True)), OLD_DIMS)
    with admin_session(_factory(db_session)) as s:
        new_id = ev.register_version(s, ev.VersionSpec("clip-a", "r2", OLD_DIMS, "tiny", True))
    _clear_scope(db_session)
    assert ev.run_backfill(_factory(db_session), new_id, embedder, batch_size=50).written == 120
    with admin_session(_factory(db_session)) as s:
        ev.activate(s, new_id)
    # Both versions share the 512 index: with the old one retired the search returns each product once.
    hits = similarity.similar_products(db_session, "acme", "p0", k=10)
    assert len({h.external_id for h in hits}) == 10
    with admin_session(_factory(db_session)) as s:
        _, index_unused = ev.drop_version(s, ids["clip"])
    assert not index_unused


def test_activate_force_and_rate_limit(admin_db_session, catalog) -> None:  # noqa: ANN001
    db_session = admin_db_session
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
    with admin_session(_factory(db_session)) as s:
        with pytest.raises(ev.VersionError, match="HNSW index|covers"):
            ev.activate(s, new_id)
        assert ev.activate(s, new_id, force=True) == ids["clip"]  # 30/120 and no index: --force
    with pytest.raises(vector_indexes.DimensionError, match="integer in 1..2000"):
        vector_indexes.ensure_dimension_index(db_session, 4096)


def test_coverage_ratio_of_nothing_to_cover() -> None:
    assert ev.Coverage(120, 60, 120).ratio == 0.5
    assert ev.Coverage(0, 0, 0).ratio == 1.0  # an empty catalog: nothing to cover
    assert ev.Coverage(0, 0, 7).ratio == 0.0  # listings exist and none is covered
    assert ev.Coverage(0, 0, 7).covers_nothing and ev.Coverage(5, 0, 5).covers_nothing
    assert not ev.Coverage(0, 0, 0).covers_nothing and not ev.Coverage(5, 1, 5).covers_nothing


def test_activation_never_takes_a_version_without_embeddings(admin_db_session, catalog) -> None:  # noqa: ANN001
    """An empty version would leave every similarity search empty: refused, --force included."""
    db_session = admin_db_session
    ids, _, _ = catalog
    with admin_session(_factory(db_session)) as s:
        empty = ev.register_version(s, ev.VersionSpec("clip-empty", "r1", OLD_DIMS, "tiny", True))
        assert ev.coverage(s, empty) == ev.Coverage(120, 0, 120)
        for force in (False, True):
            with pytest.raises(ev.VersionError, match="covers none of the 120 listings.*--force does not skip"):
                ev.activate(s, empty, force=force)
        assert ev.active_version_id(s) == ids["clip"]


def test_an_active_version_without_rows_makes_every_listing_a_target(admin_db_session, catalog) -> None:  # noqa: ANN001
    """An active version that embeds nothing (searches return nothing): the backfill covers every
    listing rather than none, so a real version can replace it."""
    db_session = admin_db_session
    ids, vectors, pids = catalog
    embedder = ProjectingEmbedder(dict(zip(pids, vectors, strict=True)), OLD_DIMS)
    with as_role(db_session, None):
        hollow = add_model_version(db_session, "clip", "clip-hollow", dims=OLD_DIMS)  # active, no rows
    with admin_session(_factory(db_session)) as s:
        new_id = ev.register_version(s, ev.VersionSpec("clip-real", "r1", OLD_DIMS, "tiny", True))
        assert ev.coverage(s, new_id) == ev.Coverage(120, 0, 120)
    _clear_scope(db_session)
    assert ev.run_backfill(_factory(db_session), new_id, embedder, batch_size=60).coverage == ev.Coverage(120, 120, 120)
    with admin_session(_factory(db_session)) as s:
        assert ev.activate(s, new_id) == hollow


def test_the_first_version_of_an_empty_catalog_can_be_activated(admin_db_session) -> None:  # noqa: ANN001
    db_session = admin_db_session
    with admin_session(_factory(db_session)) as s:
        assert s.execute(text("SELECT count(*) FROM listings")).scalar_one() == 0
        first = ev.register_version(s, ev.VersionSpec("clip-first", "r1", OLD_DIMS, "tiny", True))
        assert ev.coverage(s, first) == ev.Coverage(0, 0, 0)
        assert ev.activate(s, first) is None
        assert ev.active_version_id(s) == first


def test_the_owner_without_the_admin_role_sees_no_listings(db_session, catalog) -> None:  # noqa: ANN001
    """Why ``enrich_admin`` exists. In production the tables belong to a login that is not a
    superuser; RLS is forced, so that owner is filtered like everyone else and, with no policy of
    its own, sees no tenant's rows, system scope or not: a backfill or compare run as the owner
    would find nothing to do. The maintenance transaction refuses such a role instead of
    reporting an empty catalog; ``SET ROLE enrich_admin`` sees all 120 listings."""
    ids, vectors, pids = catalog
    owner = f"test_owner_{uuid.uuid4().hex[:8]}"
    with as_role(db_session, None):  # a non-superuser owner, for this transaction only
        db_session.execute(text(f'CREATE ROLE "{owner}" NOLOGIN'))
        for table in db_session.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars():
            db_session.execute(text(f'ALTER TABLE public."{table}" OWNER TO "{owner}"'))
        assert db_session.execute(text("SELECT count(*) FROM listings")).scalar_one() == 120  # superuser: bypass
        new_id = ev.register_version(db_session, ev.VersionSpec("clip-o", "r1", NEW_DIMS, "tiny", True))
    embedder = ProjectingEmbedder(dict(zip(pids, vectors, strict=True)), NEW_DIMS)

    with as_role(db_session, owner):
        assert db_session.execute(text("SELECT count(*) FROM listings")).scalar_one() == 0
        set_system_scope(db_session)  # the worker's and the admin's escape, not the owner's
        assert db_session.execute(text("SELECT count(*) FROM listings")).scalar_one() == 0
        assert ev.coverage(db_session, ids["clip"]) == ev.Coverage(0, 0, 0)  # looks like an empty catalog
        assert ev.pending_items(db_session, new_id) == []
        assert ev.compare(db_session, ids["clip"], queries=5).queries == 0
        with pytest.raises(ev.VersionError, match="cannot be told from hidden rows"):
            ev.activate(db_session, new_id, force=True)
        _clear_scope(db_session)
        with pytest.raises(DatabaseUnavailable, match=f"role {owner} cannot see every tenant"):
            ev.run_backfill(_factory(db_session), new_id, embedder)

    with as_role(db_session, ADMIN_ROLE):
        report = ev.run_backfill(_factory(db_session), new_id, embedder, batch_size=60)
        assert report.written == 120 and report.coverage == ev.Coverage(120, 120, 120)


def _backfilled_fine_tuned(db_session: Session, catalog, name: str) -> int:  # noqa: ANN001
    """A clip version as the embedder loop registers one (params name its dataset), backfilled."""
    _, vectors, pids = catalog
    with admin_session(_factory(db_session)) as s:
        new_id = ev.register_version(s, ev.VersionSpec(name, "r1", NEW_DIMS, "tiny", True,
                                                       params={"dataset": f"datasets/embedder/{name}"}))
    embedder = ProjectingEmbedder(dict(zip(pids, vectors, strict=True)), NEW_DIMS)
    assert ev.run_backfill(_factory(db_session), new_id, embedder).coverage.ratio == 1.0
    return new_id


def test_activate_refuses_a_fine_tuned_candidate_until_its_gate_passed(admin_db_session, catalog) -> None:  # noqa: ANN001
    """``enrich embeddings activate`` applies the rollout's gate rule: a version trained here
    (params name its dataset) serves only after a passing gate decision, or with --force."""
    db_session = admin_db_session
    ids = catalog[0]
    with as_role(db_session, None):
        vector_indexes.ensure_dimension_index(db_session, NEW_DIMS)
    new_id = _backfilled_fine_tuned(db_session, catalog, "clip-ft")

    def set_gate(gate: dict | None) -> None:
        db_session.execute(text("UPDATE model_versions SET metrics = metrics || CAST(:m AS jsonb) WHERE id = :id"),
                           {"id": new_id, "m": json.dumps({"gate": gate})})

    with admin_session(_factory(db_session)) as s:
        with pytest.raises(ev.VersionError, match=r"not passed the embedder gate: no gate decision yet"):
            ev.activate(s, new_id)
    set_gate({"promoted": False, "reasons": ["image MRR 0.41 < active 0.44 + margin"]})
    with admin_session(_factory(db_session)) as s:
        with pytest.raises(ev.VersionError, match=r"image MRR 0\.41 < active"):
            ev.activate(s, new_id)
        assert ev.active_version_id(s) == ids["clip"]  # nothing switched
    set_gate({"promoted": True, "reasons": []})
    with admin_session(_factory(db_session)) as s:
        assert ev.activate(s, new_id) == ids["clip"]
    # The rule is one function, shared with the rollout: a pretrained model is never gated here.
    assert ev.gate_refusal({"ref": "ViT-L-14/laion2b"}, {}) is None
    assert ev.gate_refusal({"dataset": "d"}, {"gate": {"promoted": False, "reasons": ["a", "b"]}}) == "a; b"


def test_activate_force_overrides_a_refused_gate(admin_db_session, catalog) -> None:  # noqa: ANN001
    db_session = admin_db_session
    ids = catalog[0]
    new_id = _backfilled_fine_tuned(db_session, catalog, "clip-ft2")
    with admin_session(_factory(db_session)) as s:
        assert ev.activate(s, new_id, force=True) == ids["clip"]
