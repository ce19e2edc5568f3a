"""Benchmark of the catalog SQL similarity interface on synthetic catalog vectors (not a test).

N clustered, L2-normalised 512-d vectors (CLIP spaces are clustered: products of a kind sit
together) in categories of skewed size, loaded into a throwaway embedded PostgreSQL+pgvector,
then for a few ``hnsw.ef_search`` values:

* HNSW build time (one partial index, the one ``similar_products`` uses);
* recall@10 of ``catalog.search_by_embedding`` against exact (numpy) search;
* p50/p95 latency of ``catalog.similar_products`` from 1 client and from 8 concurrent clients;
* filtered completeness for the rarest category: rows returned / k and recall, for the catalog
  function (iterative scan) and for a plain HNSW scan with the same filter.

    .venv/bin/python infra/bench/bench_similarity.py            # N = 100k
    .venv/bin/python infra/bench/bench_similarity.py --n 1000000 --ef 40 100
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

DIMS = 512
TENANT = "bench"
# Skewed category sizes (share of N); the last one is the rare category (0.5 %).
CATEGORIES = {"tshirt": 0.30, "dress": 0.20, "pants": 0.15, "shoes": 0.12, "shirt": 0.08, "jacket": 0.06,
              "skirt": 0.04, "hat": 0.025, "longsleeve": 0.02, "scarf": 0.005}


def synthetic(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    names = list(CATEGORIES)
    cats = rng.choice(len(names), size=n, p=np.array(list(CATEGORIES.values())) / sum(CATEGORIES.values()))
    # Each category owns a few sub-clusters (styles) around a category centre.
    centres = rng.standard_normal((len(names), DIMS)).astype(np.float32)
    styles = centres[:, None, :] + 0.7 * rng.standard_normal((len(names), 20, DIMS)).astype(np.float32)
    style = rng.integers(0, 20, n)
    v = styles[cats, style] + 0.9 * rng.standard_normal((n, DIMS)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v.astype(np.float32), cats


def load(conn: psycopg.Connection, vectors: np.ndarray, cats: np.ndarray) -> tuple[int, float]:
    names = list(CATEGORIES)
    n = len(vectors)
    with conn.cursor() as cur:
        cur.execute("INSERT INTO tenants (id) VALUES (%s)", (TENANT,))
        cur.execute("INSERT INTO merchants (tenant_id, id) VALUES (%s, 'm')", (TENANT,))
        cur.execute("INSERT INTO model_versions (kind, name, revision, profile, random_weights, dims, status) "
                    "VALUES ('vlm', 'bench-vlm', 'r', 'tiny', true, NULL, 'active'), "
                    "('clip', 'bench-clip', 'r', 'tiny', true, %s, 'active') RETURNING id", (DIMS,))
        vlm_id, clip_id = (r[0] for r in cur.fetchall())
        cur.execute("CREATE TEMP TABLE stage (n int, category text, v vector)")
        with cur.copy("COPY stage (n, category, v) FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["int4", "text", "vector"])
            for i in range(n):
                copy.write_row((i, names[cats[i]], vectors[i]))
        cur.execute("INSERT INTO products (id, tenant_id, merchant_id, external_id, version, category, title) "
                    "SELECT n + 1, %s, 'm', 'p' || n, 1, category, category || ' ' || n FROM stage", (TENANT,))
        cur.execute("INSERT INTO images (id, tenant_id, sha256, phash, dhash, width, height, byte_size, format, "
                    "storage_uri) SELECT n + 1, %s, md5(n::text) || md5('x' || n), B'0'::bit(64), B'0'::bit(64), "
                    "1, 1, 1, 'JPEG', 'file:///bench' FROM stage", (TENANT,))
        cur.execute("INSERT INTO listings (id, tenant_id, product_id, product_version, model_version_id, image_id, "
                    "category, schema_id, content, model_output, model_input, model_versions, random_weights) "
                    "SELECT n + 1, %s, n + 1, 1, %s, n + 1, category, 'x@1', '{}', '{}', '{}', '{}', true FROM stage",
                    (TENANT, vlm_id))
        cur.execute("DROP INDEX ix_embeddings_image_embedding_512_hnsw, ix_embeddings_text_embedding_512_hnsw")
        cur.execute("INSERT INTO embeddings (tenant_id, product_id, listing_id, model_version_id, category, dims, "
                    "image_embedding, text_embedding, text_input) "
                    "SELECT %s, n + 1, n + 1, %s, category, %s, v, v, '' FROM stage", (TENANT, clip_id, DIMS))
    conn.commit()
    conn.execute("SET maintenance_work_mem = '2GB'")
    start = time.perf_counter()
    # Only the image index: it is the one similar_products uses (the text one costs the same again).
    conn.execute("CREATE INDEX ix_embeddings_image_embedding_512_hnsw ON embeddings USING hnsw "
                 "((image_embedding::vector(512)) vector_cosine_ops) WHERE dims = 512")
    conn.commit()
    build_s = time.perf_counter() - start
    conn.autocommit = True
    conn.execute("VACUUM ANALYZE embeddings")
    return clip_id, build_s


def exact_topk(vectors: np.ndarray, q: np.ndarray, k: int, mask: np.ndarray | None = None) -> set[int]:
    d = 1.0 - vectors @ q
    if mask is not None:
        d = np.where(mask, d, np.inf)
    return {int(i) for i in np.argpartition(d, k)[:k] if np.isfinite(d[i])}


def percentiles(xs: list[float]) -> tuple[float, float]:
    xs = sorted(xs)
    return xs[len(xs) // 2] * 1000, xs[min(len(xs) - 1, int(len(xs) * 0.95))] * 1000


def connect(url: str, ef: int) -> psycopg.Connection:
    conn = psycopg.connect(url, autocommit=True)
    register_vector(conn)
    conn.execute("SELECT set_config('hnsw.ef_search', %s, false)", (str(ef),))
    return conn


def latency(url: str, ef: int, ids: list[int], clients: int) -> tuple[float, float, float]:
    per_client = [ids[c::clients] for c in range(clients)]
    times: list[float] = []
    lock = threading.Lock()

    def run(chunk: list[int]) -> None:
        conn = connect(url, ef)
        local = []
        for i in chunk:
            t = time.perf_counter()
            conn.execute("SELECT * FROM catalog.similar_products(%s, %s, 10, false)", (TENANT, f"p{i}")).fetchall()
            local.append(time.perf_counter() - t)
        conn.close()
        with lock:
            times.extend(local)

    threads = [threading.Thread(target=run, args=(c,)) for c in per_client]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    p50, p95 = percentiles(times)
    return p50, p95, len(times) / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--ef", type=int, nargs="+", default=[40, 100, 200])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)

    from db import migrate
    from db.embedded import start_embedded
    from db.engine import make_engine

    with tempfile.TemporaryDirectory(prefix="bench-sim-") as tmp:
        sa_url = start_embedded(Path(tmp) / "pgdata")
        engine = make_engine(sa_url, statement_timeout_ms=0)
        migrate.upgrade(engine)
        engine.dispose()
        url = sa_url.replace("postgresql+psycopg://", "postgresql://")

        t = time.perf_counter()
        vectors, cats = synthetic(args.n, rng)
        with psycopg.connect(url) as conn:
            register_vector(conn)
            conn.execute("SET statement_timeout = 0")
            _, build_s = load(conn, vectors, cats)
        rare = len(CATEGORIES) - 1
        rare_name = list(CATEGORIES)[rare]
        rare_mask = cats == rare
        print(f"N={args.n} dims={DIMS} categories={len(CATEGORIES)} rare '{rare_name}'={rare_mask.sum()} rows "
              f"({rare_mask.mean():.2%}); load {time.perf_counter() - t:.1f}s; HNSW build (m=16, "
              f"ef_construction=64) {build_s:.1f}s")

        queries = rng.choice(args.n, size=args.queries, replace=False).tolist()
        with connect(url, args.ef[0]) as conn:
            for label, category in (("unfiltered", None), (f"category={rare_name}", rare_name)):
                plan = "\n".join(r[0] for r in conn.execute(
                    "SELECT * FROM catalog.explain_search_by_embedding(%s, %s, 10, %s)",
                    (TENANT, vectors[queries[0]], category)))
                used = "HNSW index scan" if "_hnsw" in plan else "exact scan (planner's choice)"
                print(f"plan of search_by_embedding, {label}: {used}")
        print(f"{'ef_search':>9} | {'recall@10':>9} | {'1 client p50/p95 ms':>19} | "
              f"{'8 clients p50/p95 ms (q/s)':>27} | {'rare: function rows, recall':>27} | plain HNSW rows")
        for ef in args.ef:
            conn = connect(url, ef)
            hits = 0
            rare_rows = rare_hits = plain_rows = 0
            for i in queries:
                got = conn.execute("SELECT external_id FROM catalog.search_by_embedding(%s, %s, 10)",
                                   (TENANT, vectors[i])).fetchall()
                hits += len({int(r[0][1:]) for r in got} & exact_topk(vectors, vectors[i], 10))
            rare_queries = queries[:50]
            for i in rare_queries:
                got = conn.execute("SELECT external_id FROM catalog.search_by_embedding(%s, %s, 10, %s)",
                                   (TENANT, vectors[i], rare_name)).fetchall()
                rare_rows += len(got)
                rare_hits += len({int(r[0][1:]) for r in got} & exact_topk(vectors, vectors[i], 10, rare_mask))
                with conn.transaction():
                    conn.execute("SET LOCAL hnsw.iterative_scan = off")
                    conn.execute("SET LOCAL enable_seqscan = off")
                    conn.execute("SET LOCAL enable_bitmapscan = off")
                    conn.execute("SET LOCAL enable_sort = off")
                    plain_rows += len(conn.execute(
                        "SELECT id FROM embeddings WHERE dims = 512 AND tenant_id = %s AND category = %s "
                        "ORDER BY image_embedding::vector(512) <=> %s::vector(512) LIMIT 10",
                        (TENANT, rare_name, vectors[i])).fetchall())
            conn.close()
            s50, s95, _ = latency(url, ef, queries, 1)
            c50, c95, qps = latency(url, ef, queries * 2, 8)
            nr = len(rare_queries)
            print(f"{ef:>9} | {hits / (10 * len(queries)):>9.3f} | {s50:>8.1f} / {s95:>8.1f} | "
                  f"{c50:>8.1f} / {c95:>8.1f} ({qps:>5.0f}) | {rare_rows / nr:>11.1f}/10, {rare_hits / (10 * nr):>6.3f}"
                  f" | {plain_rows / nr:.1f}/10")


if __name__ == "__main__":
    main()
