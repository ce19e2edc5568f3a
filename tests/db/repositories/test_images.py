"""Image repository: near-duplicate candidates in a crowded multi-tenant index, duplicate groups.

The searches run as the pipeline runs them: ``enrich_worker`` in the tenant's scope under forced
row-level security. Rows are seeded as the superuser test connection (RLS would hide the other
tenants it seeds).
"""

from __future__ import annotations

import random

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from db.repositories import images
from db.tables import Merchant, Product, ProductImage, Tenant
from models.dedup import CANDIDATE_K, CANDIDATE_MAX_HAMMING
from tests.conftest import READER_ROLE, in_tenant

TENANT = "acme"


def _bits(value: int) -> str:
    return format(value, "064b")


def _flip(rng: random.Random, value: int, n: int) -> int:
    for bit in rng.sample(range(64), n):
        value ^= 1 << bit
    return value


def _insert_images(session: Session, rows: list[tuple[str, str, str]]) -> list[int]:
    """(tenant, phash, dhash) rows; returns their ids in order."""
    return [session.execute(text(
        "INSERT INTO images (tenant_id, sha256, phash, dhash, width, height, byte_size, format, storage_uri)"
        " VALUES (:t, md5(random()::text) || md5(random()::text), CAST(:p AS bit(64)), CAST(:d AS bit(64)),"
        " 64, 64, 1, 'JPEG', 'file:///originals/x') RETURNING id"), {"t": t, "p": p, "d": d}).scalar_one()
        for t, p, d in rows]


# The crowd: other tenants' hashes (random bit patterns) within 8 bits of the query on both kinds,
# closer to it than the tenant's real copy (12 and 14 bits, well inside CANDIDATE_MAX_HAMMING).
OTHER_TENANTS, TENANT_OTHERS = 40, 400
_OLD_QUERY = (  # near_candidates before the fix: one global HNSW scan per hash, tenant filter after
    "SELECT id FROM (("
    "  SELECT id FROM images WHERE tenant_id = :t AND id <> :id"
    "  ORDER BY phash <~> CAST(:p AS bit(64)) LIMIT :k"
    ") UNION ("
    "  SELECT id FROM images WHERE tenant_id = :t AND id <> :id"
    "  ORDER BY dhash <~> CAST(:d AS bit(64)) LIMIT :k"
    ")) c")


def _crowd(session: Session, *, seed: int, crowd: int) -> dict:
    rng = random.Random(seed)
    query_p, query_d = rng.getrandbits(64), rng.getrandbits(64)
    others = [f"crowd-{i}" for i in range(OTHER_TENANTS)]
    session.add_all([Tenant(id=t) for t in [TENANT, *others]])
    session.flush()
    rows = [(others[i % OTHER_TENANTS], _bits(_flip(rng, query_p, rng.randint(0, 8))),
             _bits(_flip(rng, query_d, rng.randint(0, 8)))) for i in range(crowd)]
    mine = [(TENANT, _bits(rng.getrandbits(64)), _bits(rng.getrandbits(64))) for _ in range(TENANT_OTHERS)]
    copy = (TENANT, _bits(_flip(rng, query_p, 12)), _bits(_flip(rng, query_d, 14)))
    ids = _insert_images(session, [*rows, *mine[:200], copy, *mine[200:]])
    # The plan a production-size table gets (measured: the planner takes the HNSW index from a few
    # thousand rows on); a table this small would get an exact scan + sort for the old query too.
    for setting in ("enable_seqscan", "enable_bitmapscan", "enable_sort"):
        session.execute(text(f"SET LOCAL {setting} = off"))
    return {"p": _bits(query_p), "d": _bits(query_d), "copy": ids[crowd + 200], "query_id": 0}


@pytest.fixture
def crowded(db_session: Session) -> dict:
    """1,200 look-alikes around one query: whether even an iterative HNSW scan reaches the copy
    depends on how the graph was built (the crowd's neighbour lists need not lead out of it; seen
    both ways here); only an exact scan of the tenant's rows is sure."""
    return _crowd(db_session, seed=7, crowd=1200)


@pytest.fixture
def lightly_crowded(db_session: Session) -> dict:
    """100 look-alikes: more than ef_search (40), few enough for an iterative scan to walk past."""
    return _crowd(db_session, seed=11, crowd=100)


def test_the_tenants_copy_is_found_however_other_tenants_crowd_the_index(db_session: Session,
                                                                          crowded: dict) -> None:
    params = {"t": TENANT, "id": 0, "p": crowded["p"], "d": crowded["d"], "k": CANDIDATE_K}
    with in_tenant(db_session, TENANT):
        # The premise: one global HNSW scan per hash, filtered by tenant afterwards, loses the copy.
        plan = "\n".join(db_session.execute(text("EXPLAIN " + _OLD_QUERY), params).scalars())
        assert "ix_images_phash_hnsw" in plan and "ix_images_dhash_hnsw" in plan, plan
        assert crowded["copy"] not in db_session.execute(text(_OLD_QUERY), params).scalars().all()

        found = images.near_candidates(db_session, TENANT, crowded["query_id"], phash=crowded["p"],
                                       dhash=crowded["d"], k=CANDIDATE_K, max_hamming=CANDIDATE_MAX_HAMMING)
        tenants = set(db_session.execute(text("SELECT tenant_id FROM images WHERE id = ANY(:ids)"),
                                         {"ids": [c.image_id for c in found]}).scalars())
    assert found and found[0].image_id == crowded["copy"] and found[0].hamming == 12
    assert tenants == {TENANT}
    assert [c.hamming for c in found] == sorted(c.hamming for c in found)


def test_the_index_path_scans_iteratively_and_leaves_the_settings_as_they_were(db_session: Session,
                                                                               lightly_crowded: dict) -> None:
    """A tenant above the exact-scan size goes through HNSW with a strict-order iterative scan, set
    only for the search itself."""
    crowded = lightly_crowded
    params = {"t": TENANT, "id": 0, "p": crowded["p"], "d": crowded["d"], "k": CANDIDATE_K}
    settings = "SELECT current_setting('hnsw.iterative_scan'), current_setting('hnsw.max_scan_tuples')"
    with in_tenant(db_session, TENANT):
        assert crowded["copy"] not in db_session.execute(text(_OLD_QUERY), params).scalars().all()
        db_session.execute(text("SET LOCAL hnsw.iterative_scan = off"))
        before = db_session.execute(text(settings)).one()
        found = images.near_candidates(db_session, TENANT, crowded["query_id"], phash=crowded["p"],
                                       dhash=crowded["d"], k=CANDIDATE_K, max_hamming=CANDIDATE_MAX_HAMMING,
                                       exact_up_to=TENANT_OTHERS // 2)
        assert db_session.execute(text(settings)).one() == before
    assert found and found[0].image_id == crowded["copy"]


def test_exclusions_are_never_candidates(db_session: Session, crowded: dict) -> None:
    with in_tenant(db_session, TENANT):
        found = images.near_candidates(db_session, TENANT, crowded["copy"], phash=crowded["p"],
                                       dhash=crowded["d"], k=CANDIDATE_K, max_hamming=64,
                                       exclude=(crowded["copy"] + 1,))
    assert found and {crowded["copy"], crowded["copy"] + 1}.isdisjoint(c.image_id for c in found)


# ------------------------------------------------------------------ duplicate groups


@pytest.fixture
def products(db_session: Session) -> dict[str, int]:
    db_session.add(Tenant(id=TENANT))
    db_session.flush()
    db_session.add(Merchant(tenant_id=TENANT, id="m"))
    db_session.flush()
    rows = {ext: Product(tenant_id=TENANT, merchant_id="m", external_id=ext, version=1, category="dress")
            for ext in ("orig", "relisted", "reupload")}
    db_session.add_all(rows.values())
    db_session.flush()
    return {ext: p.id for ext, p in rows.items()}


def _use(session: Session, product_id: int, image_id: int) -> None:
    session.add(ProductImage(tenant_id=TENANT, product_id=product_id, product_version=1, position=0,
                             image_id=image_id, role="primary", source_url="https://cdn.example.com/x.jpg"))
    session.flush()


def _groups(session: Session) -> list[tuple[int, list[tuple[str, int, list[str]]]]]:
    with in_tenant(session, TENANT, READER_ROLE):
        rows = session.execute(text("SELECT representative_image_id, members FROM catalog.duplicate_groups"
                                    " WHERE tenant_id = :t ORDER BY group_id"), {"t": TENANT}).all()
    return [(r.representative_image_id, [(m["method"], m["image_id"], m["products"]) for m in r.members])
            for r in rows]


def test_an_exact_duplicate_is_a_group_in_the_view_and_recording_it_again_changes_nothing(
        db_session: Session, products: dict[str, int]) -> None:
    (image,) = _insert_images(db_session, [(TENANT, _bits(1), _bits(2))])
    _use(db_session, products["orig"], image)
    _use(db_session, products["relisted"], image)
    for _ in range(2):
        with in_tenant(db_session, TENANT):
            images.record_exact_duplicate(db_session, TENANT, image)
        assert _groups(db_session) == [(image, [("exact", image, ["orig", "relisted"])])]


@pytest.mark.parametrize("exact_first", [True, False])
def test_exact_and_near_copies_make_the_same_group_in_either_order(db_session: Session,
                                                                    products: dict[str, int],
                                                                    exact_first: bool) -> None:
    image, near = _insert_images(db_session, [(TENANT, _bits(1), _bits(2)), (TENANT, _bits(3), _bits(2))])
    _use(db_session, products["orig"], image)
    _use(db_session, products["relisted"], image)
    _use(db_session, products["reupload"], near)
    steps = [lambda: images.record_exact_duplicate(db_session, TENANT, image),
             lambda: images.record_near_duplicate(db_session, TENANT, near, image, 2, 80)]
    with in_tenant(db_session, TENANT):
        for step in steps if exact_first else steps[::-1]:
            step()
    assert _groups(db_session) == [(image, [("exact", image, ["orig", "relisted"]),
                                            ("near", near, ["reupload"])])]
