"""Candidate search compares four ways (plain, trimmed, mirrored, centre), in both search paths, as the
pipeline runs it: ``enrich_worker`` in the tenant's scope under forced row-level security."""

from __future__ import annotations

import random

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from db.repositories import images
from db.tables import Tenant
from models.dedup import CANDIDATE_K, CANDIDATE_MAX_HAMMING
from tests.conftest import in_tenant
from tests.db.repositories.test_images import _bits, _flip

TENANT, OTHER = "acme", "globex"


def _insert(session: Session, tenant: str, phash: int, dhash: int, trimmed: tuple[int, int] | None,
            centre: tuple[int, int] | None = None) -> int:
    return session.execute(text(
        "INSERT INTO images (tenant_id, sha256, phash, dhash, phash_trimmed, dhash_trimmed, phash_centre,"
        " dhash_centre, width, height, byte_size, format, storage_uri)"
        " VALUES (:t, md5(random()::text) || md5(random()::text), CAST(:p AS bit(64)), CAST(:d AS bit(64)),"
        " CAST(:pt AS bit(64)), CAST(:dt AS bit(64)), CAST(:pc AS bit(64)), CAST(:dc AS bit(64)), 64, 64, 1,"
        " 'JPEG', 'file:///originals/x') RETURNING id"),
        {"t": tenant, "p": _bits(phash), "d": _bits(dhash),
         "pt": None if trimmed is None else _bits(trimmed[0]),
         "dt": None if trimmed is None else _bits(trimmed[1]),
         "pc": None if centre is None else _bits(centre[0]),
         "dc": None if centre is None else _bits(centre[1])}).scalar_one()


@pytest.fixture
def catalog(db_session: Session) -> dict:
    """A query (plain, trimmed, mirrored and centre hashes) and stored images that each match it one way
    only; every other image is a random 64-bit pattern (~32 bits away)."""
    rng = random.Random(3)
    db_session.add_all([Tenant(id=TENANT), Tenant(id=OTHER)])
    db_session.flush()
    q = {name: (rng.getrandbits(64), rng.getrandbits(64)) for name in ("plain", "trimmed", "mirrored", "centre")}
    noise = lambda: rng.getrandbits(64)  # noqa: E731
    ids = {
        # Letterboxed when stored: its plain hashes are far, its trimmed ones near the query's trimmed.
        "boxed": _insert(db_session, TENANT, noise(), noise(), (_flip(rng, q["trimmed"][0], 5),
                                                                _flip(rng, q["trimmed"][1], 9))),
        # The mirror of the query: its trimmed hashes are near the query's mirrored trimmed ones.
        "mirror": _insert(db_session, TENANT, noise(), noise(), (_flip(rng, q["mirrored"][0], 7),
                                                                 _flip(rng, q["mirrored"][1], 3))),
        # Its background re-coloured: only the hashes of its centre are near the query's centre ones.
        "backdrop": _insert(db_session, TENANT, noise(), noise(), (noise(), noise()),
                            (_flip(rng, q["centre"][0], 13), _flip(rng, q["centre"][1], 6))),
        # Stored before migration 0009 (no trimmed hashes): its plain ones stand in for them.
        "legacy": _insert(db_session, TENANT, _flip(rng, q["trimmed"][0], 11), noise(), None),
        # Stored without centre hashes: its plain ones stand in for them.
        "legacy_centre": _insert(db_session, TENANT, noise(), _flip(rng, q["centre"][1], 10), (noise(), noise())),
        # The same bytes in another tenant: never a candidate.
        "elsewhere": _insert(db_session, OTHER, *q["plain"], q["trimmed"]),
    }
    for _ in range(300):
        _insert(db_session, TENANT, noise(), noise(), (noise(), noise()), (noise(), noise()))
    return {"q": q, "ids": ids}


def _search(session: Session, catalog: dict, **kwargs) -> dict[int, int]:  # noqa: ANN003
    q = catalog["q"]
    with in_tenant(session, TENANT):
        found = images.near_candidates(session, TENANT, 0, phash=_bits(q["plain"][0]), dhash=_bits(q["plain"][1]),
                                       trimmed=(_bits(q["trimmed"][0]), _bits(q["trimmed"][1])),
                                       mirrored=(_bits(q["mirrored"][0]), _bits(q["mirrored"][1])),
                                       centre=(_bits(q["centre"][0]), _bits(q["centre"][1])),
                                       k=CANDIDATE_K, max_hamming=CANDIDATE_MAX_HAMMING, **kwargs)
    assert [c.hamming for c in found] == sorted(c.hamming for c in found)
    return {c.image_id: c.hamming for c in found}


def test_each_comparison_finds_its_copy_and_only_this_tenants(db_session: Session, catalog: dict) -> None:
    ids = catalog["ids"]
    found = _search(db_session, catalog)
    assert {ids["boxed"]: 5, ids["mirror"]: 3, ids["backdrop"]: 6, ids["legacy"]: 11,
            ids["legacy_centre"]: 10}.items() <= found.items()
    assert ids["elsewhere"] not in found


def test_the_index_path_searches_the_trimmed_columns_too(db_session: Session, catalog: dict) -> None:
    """A tenant above the exact-scan size goes through eight HNSW scans (plain, trimmed and centre
    indexes); a row without trimmed or centre hashes is reached through the plain index only."""
    ids = catalog["ids"]
    found = _search(db_session, catalog, exact_up_to=10)
    assert {ids["boxed"]: 5, ids["mirror"]: 3, ids["backdrop"]: 6}.items() <= found.items()
    assert ids["elsewhere"] not in found


def test_without_variants_the_search_is_the_plain_one(db_session: Session, catalog: dict) -> None:
    q, ids = catalog["q"], catalog["ids"]
    with in_tenant(db_session, TENANT):
        found = images.near_candidates(db_session, TENANT, 0, phash=_bits(q["plain"][0]), dhash=_bits(q["plain"][1]),
                                       k=CANDIDATE_K, max_hamming=CANDIDATE_MAX_HAMMING)
    assert not {ids["boxed"], ids["mirror"], ids["backdrop"], ids["legacy"], ids["legacy_centre"]} \
        & {c.image_id for c in found}
