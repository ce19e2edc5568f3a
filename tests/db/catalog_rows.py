"""Bulk row builders for the SQL-interface tests: tenants → products → images → listings → embeddings.

Inserts go through set-based SQL (unnest) so a few thousand products take well under a second.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
from sqlalchemy import text
from sqlalchemy.orm import Session

from db.vector_indexes import DEFAULT_GRAPH


def unit_rows(rng: np.random.Generator, n: int, dims: int) -> np.ndarray:
    v = rng.standard_normal((n, dims)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def clustered(rng: np.random.Generator, n: int, dims: int, centres: np.ndarray, spread: float = 0.35,
              assign: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Points around unit centres (clusters as in real CLIP spaces); returns (vectors, cluster ids)."""
    if assign is None:
        assign = rng.integers(0, len(centres), n)
    v = centres[assign] + spread * rng.standard_normal((n, dims)).astype(np.float32) / np.sqrt(dims) * 4
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32), assign


def exact_nearest(vectors: np.ndarray, query: np.ndarray, k: int, mask: np.ndarray | None = None) -> list[int]:
    """Row indexes of the ``k`` nearest unit vectors by cosine distance (exact), within ``mask``."""
    distance = 1.0 - vectors @ query
    if mask is not None:
        distance = np.where(mask, distance, np.inf)
    return [int(i) for i in np.argsort(distance)[:k] if np.isfinite(distance[i])]


def add_tenant(session: Session, tenant: str, merchant: str = "m1") -> None:
    session.execute(text("INSERT INTO tenants (id) VALUES (:t) ON CONFLICT DO NOTHING"), {"t": tenant})
    session.execute(text("INSERT INTO merchants (tenant_id, id) VALUES (:t, :m) ON CONFLICT DO NOTHING"),
                    {"t": tenant, "m": merchant})


def add_model_version(session: Session, kind: str, name: str, *, dims: int | None = None,
                      status: str = "active") -> int:
    if status == "active":
        session.execute(text("UPDATE model_versions SET status = 'retired' WHERE kind = :k AND status = 'active'"),
                        {"k": kind})
    return int(session.execute(
        text("INSERT INTO model_versions (kind, name, revision, profile, random_weights, dims, status) "
             "VALUES (:k, :n, 'r1', 'tiny', true, :d, :s) RETURNING id"),
        {"k": kind, "n": name, "d": dims, "s": status},
    ).scalar_one())


def add_products(session: Session, tenant: str, external_ids: Sequence[str], categories: Sequence[str], *,
                 version: int = 1, merchant: str = "m1") -> list[int]:
    rows = session.execute(
        text("INSERT INTO products (tenant_id, merchant_id, external_id, version, category, title) "
             "SELECT :t, :m, x.ext, :v, x.cat, 'title ' || x.ext "
             "FROM unnest(CAST(:exts AS text[]), CAST(:cats AS text[])) AS x(ext, cat) "
             "ON CONFLICT (tenant_id, external_id) DO UPDATE SET version = EXCLUDED.version "
             "RETURNING id, external_id"),
        {"t": tenant, "m": merchant, "v": version, "exts": list(external_ids), "cats": list(categories)},
    ).all()
    by_ext = {r.external_id: r.id for r in rows}
    return [by_ext[e] for e in external_ids]


def add_listings(session: Session, tenant: str, product_ids: Sequence[int], categories: Sequence[str], *,
                 vlm_id: int, version: int = 1, status: str = "proposed") -> list[int]:
    image_ids = session.execute(
        text("INSERT INTO images (tenant_id, sha256, phash, dhash, width, height, byte_size, format, storage_uri) "
             "SELECT CAST(:t AS text), md5(CAST(:t AS text) || x.pid::text || CAST(:v AS text) || CAST(:mv AS text)) "
             "|| md5(x.pid::text || CAST(:v AS text) || CAST(:mv AS text)), "
             "B'0000000000000000000000000000000000000000000000000000000000000000', "
             "B'0000000000000000000000000000000000000000000000000000000000000000', 64, 64, 100, 'JPEG', "
             "'file:///nonexistent/' || x.pid::text || '.jpg' "
             "FROM unnest(CAST(:pids AS bigint[])) WITH ORDINALITY AS x(pid, n) ORDER BY x.n RETURNING id"),
        {"t": tenant, "pids": list(product_ids), "v": version, "mv": vlm_id},
    ).scalars().all()
    return list(session.execute(
        text("INSERT INTO listings (tenant_id, product_id, product_version, model_version_id, image_id, category, "
             "schema_id, content, model_output, model_input, model_versions, random_weights, status) "
             "SELECT :t, x.pid, :v, :mv, x.img, x.cat, x.cat || '@1', "
             "jsonb_build_object('title', 'listing ' || x.pid::text, 'description', 'd', 'attributes', '{}'::jsonb), "
             "'{}'::jsonb, '{}'::jsonb, '{}'::jsonb, true, :s "
             "FROM unnest(CAST(:pids AS bigint[]), CAST(:imgs AS bigint[]), CAST(:cats AS text[])) "
             "WITH ORDINALITY AS x(pid, img, cat, n) ORDER BY x.n RETURNING id"),
        {"t": tenant, "v": version, "mv": vlm_id, "pids": list(product_ids), "imgs": list(image_ids),
         "cats": list(categories), "s": status},
    ).scalars().all())


def add_embeddings(session: Session, tenant: str, product_ids: Sequence[int], listing_ids: Sequence[int],
                   categories: Sequence[str], vectors: np.ndarray, *, clip_id: int,
                   text_vectors: np.ndarray | None = None) -> None:
    text_vectors = vectors if text_vectors is None else text_vectors
    session.execute(
        text("INSERT INTO embeddings (tenant_id, product_id, listing_id, model_version_id, category, dims, "
             "image_embedding, text_embedding, text_input) "
             "SELECT :t, x.pid, x.lid, :c, x.cat, :d, CAST(x.img AS vector), CAST(x.txt AS vector), 'visual text' "
             "FROM unnest(CAST(:pids AS bigint[]), CAST(:lids AS bigint[]), CAST(:cats AS text[]), "
             "CAST(:imgs AS text[]), CAST(:txts AS text[])) AS x(pid, lid, cat, img, txt)"),
        {"t": tenant, "c": clip_id, "d": int(vectors.shape[1]), "pids": list(product_ids),
         "lids": list(listing_ids), "cats": list(categories),
         "imgs": [_literal(v) for v in vectors], "txts": [_literal(v) for v in text_vectors]},
    )


def add_catalog(session: Session, tenant: str, vectors: np.ndarray, categories: Sequence[str], *,
                vlm_id: int, clip_id: int, prefix: str = "p", version: int = 1) -> list[int]:
    """One product per vector, with listing and embedding; returns product ids."""
    add_tenant(session, tenant)
    exts = [f"{prefix}{n}" for n in range(len(vectors))]
    pids = add_products(session, tenant, exts, categories, version=version)
    lids = add_listings(session, tenant, pids, categories, vlm_id=vlm_id, version=version)
    add_embeddings(session, tenant, pids, lids, categories, vectors, clip_id=clip_id)
    return pids


@contextmanager
def bulk_load(session: Session, dims: int = 512) -> Iterator[None]:
    """Drop the partial HNSW indexes for ``dims`` and rebuild them (with the project's graph) after the load (much faster than
    inserting row by row into the graph); transactional DDL, so the test's rollback restores them."""
    session.execute(text(f"DROP INDEX IF EXISTS ix_embeddings_image_embedding_{dims}_hnsw, "
                         f"ix_embeddings_text_embedding_{dims}_hnsw"))
    yield
    for column in ("image_embedding", "text_embedding"):
        session.execute(text(f"CREATE INDEX ix_embeddings_{column}_{dims}_hnsw ON embeddings USING hnsw "
                             f"(({column}::vector({dims})) vector_cosine_ops) {DEFAULT_GRAPH.with_clause()} "
                             f"WHERE dims = {dims}"))
    session.execute(text("ANALYZE embeddings, listings, products"))  # the search joins all three


def _literal(v: np.ndarray) -> str:
    return "[" + ",".join(f"{x:.6g}" for x in v) + "]"
