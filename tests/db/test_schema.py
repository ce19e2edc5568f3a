"""The first migration's guarantees: content addressing and index-backed similarity queries."""

from __future__ import annotations

import random

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from db.tables import Image, Tenant


def _bits(rng: random.Random) -> str:
    return "".join(rng.choice("01") for _ in range(64))


def _image(tenant: str, sha: str, rng: random.Random) -> Image:
    return Image(tenant_id=tenant, sha256=sha, phash=_bits(rng), dhash=_bits(rng), width=10, height=10,
                 byte_size=100, format="JPEG", storage_uri=f"/x/{sha}")


def test_same_sha256_twice_fails_on_the_unique_key(db_session) -> None:  # noqa: ANN001
    rng = random.Random(0)
    db_session.add(Tenant(id="t1"))
    db_session.flush()
    db_session.add(_image("t1", "a" * 64, rng))
    db_session.flush()
    db_session.add(_image("t1", "a" * 64, rng))
    with pytest.raises(IntegrityError, match="uq_images_tenant_id_sha256"):
        db_session.flush()


def test_hamming_and_cosine_queries_use_hnsw(db_session) -> None:  # noqa: ANN001
    rng = random.Random(1)
    db_session.add(Tenant(id="t1"))
    db_session.flush()
    db_session.add_all([_image("t1", f"{i:064x}", rng) for i in range(300)])
    db_session.flush()
    db_session.execute(text("ANALYZE images"))
    # A 300-row table is cheap to scan; force the planner to show what it does at catalog scale.
    db_session.execute(text("SET LOCAL enable_seqscan = off"))
    db_session.execute(text("SET LOCAL enable_bitmapscan = off"))
    db_session.execute(text("SET LOCAL hnsw.iterative_scan = relaxed_order"))
    plan = "\n".join(db_session.execute(text(
        "EXPLAIN SELECT id FROM images WHERE tenant_id = 't1' "
        "ORDER BY phash <~> CAST(:q AS bit(64)) LIMIT 5"), {"q": _bits(rng)}).scalars())
    assert "ix_images_phash_hnsw" in plan, plan

    plan = "\n".join(db_session.execute(text(
        "EXPLAIN SELECT id FROM embeddings WHERE dims = 512 "
        "ORDER BY image_embedding::vector(512) <=> CAST(:q AS vector(512)) LIMIT 5"),
        {"q": str([0.1] * 512)}).scalars())
    assert "ix_embeddings_image_embedding_512_hnsw" in plan, plan


def test_every_tenant_table_has_tenant_column(engine) -> None:  # noqa: ANN001
    from db.tables import TENANT_SCOPED_TABLES

    assert {"products", "images", "listings", "embeddings", "enrichment_jobs"} <= set(TENANT_SCOPED_TABLES)
