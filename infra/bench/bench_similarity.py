"""Benchmark of the catalog SQL similarity interface on synthetic catalog vectors (not a test).

N clustered, L2-normalised 512-d vectors (CLIP spaces are clustered: products of a kind sit
together) in categories of skewed size, loaded into a throwaway embedded PostgreSQL+pgvector.
Every query runs as an analyst runs it: as ``enrich_reader`` under forced row-level security.
The reference is the **bare index scan**: ``SELECT product_id FROM embeddings WHERE dims = 512
ORDER BY image_embedding::vector(512) <=> q LIMIT 10`` on the same partial HNSW index, same role
(with the tenant set, so the same policies apply), same ``hnsw.ef_search``. For each ef_search:

* recall@10 of ``catalog.search_by_embedding`` and of the bare scan against exact (numpy) search;
* p50/p95 latency from one client of the bare scan, ``search_by_embedding`` and
  ``similar_products``, and each function's p50 as a ratio to the bare scan's;
* throughput (queries/s) from 1 and from 8 concurrent clients, each client its own process, and the ratio;
* category-filtered searches (a 20 % and the rare 0.5 % category, queried from random products,
  mostly of other categories): rows returned / k, recall, p50.

Then the two alternatives of issue 16, measured on the same data:

* ``--grouped``: per-category partial HNSW indexes (``WHERE dims = 512 AND category = c``) beside
  the global one: build time, size, and the filtered searches again (the function plans filtered
  searches per call, so the planner picks the category's index when there is one);
* ``--halfvec``: a ``halfvec(512)`` expression index: build time, size, recall and latency of its
  bare scan against the ``vector`` one.

    .venv/bin/python infra/bench/bench_similarity.py                        # N = 100k
    .venv/bin/python infra/bench/bench_similarity.py --n 1000000 --ef 40 100 --grouped --halfvec
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from db.vector_indexes import DEFAULT_GRAPH  # noqa: E402  (the project's graph, the benchmark's default)

DIMS = 512
TENANT = "bench"
READER = "enrich_reader"
# Skewed category sizes (share of N); the last one is the rare category (0.5 %).
CATEGORIES = {"tshirt": 0.30, "dress": 0.20, "pants": 0.15, "shoes": 0.12, "shirt": 0.08, "jacket": 0.06,
              "skirt": 0.04, "hat": 0.025, "longsleeve": 0.02, "scarf": 0.005}
BARE = (f"SELECT product_id FROM embeddings WHERE dims = {DIMS} "
        f"ORDER BY image_embedding::vector({DIMS}) <=> %s::vector({DIMS}) LIMIT 10")
BARE_HALF = (f"SELECT product_id FROM embeddings WHERE dims = {DIMS} "
             f"ORDER BY image_embedding::halfvec({DIMS}) <=> %s::vector({DIMS})::halfvec({DIMS}) LIMIT 10")
SEARCH = "SELECT external_id FROM catalog.search_by_embedding(%s, %s, 10)"
SEARCH_IN = "SELECT external_id FROM catalog.search_by_embedding(%s, %s, 10, %s)"
SIMILAR = "SELECT external_id FROM catalog.similar_products(%s, %s, 10, false)"


def synthetic(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    names = list(CATEGORIES)
    cats = rng.choice(len(names), size=n, p=np.array(list(CATEGORIES.values())) / sum(CATEGORIES.values()))
    # Each category owns a few sub-clusters (styles) around a category centre.
    centres = rng.standard_normal((len(names), DIMS)).astype(np.float32)
    styles = centres[:, None, :] + 0.7 * rng.standard_normal((len(names), 20, DIMS)).astype(np.float32)
    style = rng.integers(0, 20, n)
    v = np.empty((n, DIMS), dtype=np.float32)
    for start in range(0, n, 100_000):  # in slices: 1M x 512 float64 noise would need 4 GB at once
        end = min(n, start + 100_000)
        v[start:end] = styles[cats[start:end], style[start:end]] + 0.9 * rng.standard_normal(
            (end - start, DIMS)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v, cats


def load(conn: psycopg.Connection, vectors: np.ndarray, cats: np.ndarray) -> None:
    """Rows as the pipeline writes them (product, image, listing, embedding), in bulk as the superuser."""
    names = list(CATEGORIES)
    with conn.cursor() as cur:
        # Foreign keys hold by construction; their per-row triggers would dominate a million-row load.
        cur.execute("SET session_replication_role = replica")
        # The perceptual-hash HNSW indexes of near-duplicate search play no part here, and a million
        # identical placeholder hashes make every insert into them walk the whole graph.
        for (name,) in cur.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'images' "
                                   "AND indexdef LIKE '%%USING hnsw%%'").fetchall():
            cur.execute(f'DROP INDEX "{name}"')
        cur.execute("INSERT INTO tenants (id) VALUES (%s)", (TENANT,))
        cur.execute("INSERT INTO merchants (tenant_id, id) VALUES (%s, 'm')", (TENANT,))
        cur.execute("INSERT INTO model_versions (kind, name, revision, profile, random_weights, dims, status) "
                    "VALUES ('vlm', 'bench-vlm', 'r', 'tiny', true, NULL, 'active'), "
                    "('clip', 'bench-clip', 'r', 'tiny', true, %s, 'active') RETURNING id", (DIMS,))
        vlm_id, clip_id = (r[0] for r in cur.fetchall())
        cur.execute("CREATE TEMP TABLE stage (n int, category text, v vector)")
        with cur.copy("COPY stage (n, category, v) FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["int4", "text", "vector"])
            for i in range(len(vectors)):
                copy.write_row((i, names[cats[i]], vectors[i]))
        cur.execute("INSERT INTO products (id, tenant_id, merchant_id, external_id, version, category, title) "
                    "SELECT n + 1, %s, 'm', 'p' || n, 1, category, category || ' ' || n FROM stage", (TENANT,))
        cur.execute("INSERT INTO images (id, tenant_id, sha256, phash, dhash, width, height, byte_size, format, "
                    "storage_uri) SELECT n + 1, %s, lpad(to_hex(n), 64, '0'), B'0'::bit(64), B'0'::bit(64), "
                    "1, 1, 1, 'JPEG', 'file:///bench' FROM stage", (TENANT,))
        cur.execute("INSERT INTO listings (id, tenant_id, product_id, product_version, model_version_id, image_id, "
                    "category, schema_id, content, model_output, model_input, model_versions, random_weights) "
                    "SELECT n + 1, %s, n + 1, 1, %s, n + 1, category, 'x@1', '{}', '{}', '{}', '{}', true FROM stage",
                    (TENANT, vlm_id))
        cur.execute(f"DROP INDEX ix_embeddings_image_embedding_{DIMS}_hnsw, ix_embeddings_text_embedding_{DIMS}_hnsw")
        cur.execute("INSERT INTO embeddings (tenant_id, product_id, listing_id, model_version_id, category, dims, "
                    "image_embedding, text_embedding, text_input) "
                    "SELECT %s, n + 1, n + 1, %s, category, %s, v, v, '' FROM stage", (TENANT, clip_id, DIMS))
        cur.execute("SET session_replication_role = DEFAULT")
    conn.commit()


def build_index(conn: psycopg.Connection, name: str, expression: str, where: str, workers: int,
                graph: tuple[int, int] = (DEFAULT_GRAPH.m, DEFAULT_GRAPH.ef_construction)) -> float:
    """Seconds to build one partial HNSW index; ``graph`` is (m, ef_construction), the project's
    (``db.vector_indexes.DEFAULT_GRAPH``) unless the run asks for another graph."""
    conn.execute(f"SET max_parallel_maintenance_workers = {workers}")
    m, ef_construction = graph
    start = time.perf_counter()
    conn.execute(f"CREATE INDEX {name} ON embeddings USING hnsw ({expression}) "
                 f"WITH (m = {int(m)}, ef_construction = {int(ef_construction)}) WHERE {where}")
    return time.perf_counter() - start


def index_mb(conn: psycopg.Connection, like: str) -> float:
    return conn.execute("SELECT coalesce(sum(pg_relation_size(c.oid)), 0) / 1048576.0 FROM pg_class c "
                        "WHERE c.relkind = 'i' AND c.relname LIKE %s", (like,)).fetchone()[0]


def exact_topk(vectors: np.ndarray, q: np.ndarray, k: int, mask: np.ndarray | None = None) -> set[int]:
    d = 1.0 - vectors @ q
    if mask is not None:
        d = np.where(mask, d, np.inf)
    return {int(i) for i in np.argpartition(d, k)[:k] if np.isfinite(d[i])}


def percentiles(xs: list[float]) -> tuple[float, float]:
    xs = sorted(xs)
    return xs[len(xs) // 2] * 1000, xs[min(len(xs) - 1, int(len(xs) * 0.95))] * 1000


def connect(url: str, ef: int) -> psycopg.Connection:
    """An analyst's session: the reader role, its tenant (for the bare scan; the functions set their own)."""
    conn = psycopg.connect(url, autocommit=True)
    register_vector(conn)
    conn.execute(f"SET ROLE {READER}")
    conn.execute("SELECT set_config('hnsw.ef_search', %s, false), set_config('enrich.tenant_id', %s, false)",
                 (str(ef), TENANT))
    return conn


Query = Callable[[psycopg.Connection, int], list]


def timed(url: str, ef: int, ids: list[int], clients: int, query: Query) -> tuple[float, float, float]:
    """(p50 ms, p95 ms, queries/s) of ``query`` over ``ids`` split across ``clients`` connections, each
    driven by its own forked process (threads of one interpreter would measure the client's GIL: at
    1M rows eight threads reached 0.4-0.6x of one client). Every client connects and runs one warm-up
    query (the first call of a session plans and caches), then all start together."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    per_client = [ids[c::clients] for c in range(clients)]
    ready, go, results = ctx.Barrier(clients + 1), ctx.Event(), ctx.Queue()

    def run(chunk: list[int]) -> None:
        conn = connect(url, ef)
        query(conn, ids[0])
        ready.wait()
        go.wait()
        local = []
        for i in chunk:
            t = time.perf_counter()
            query(conn, i)
            local.append(time.perf_counter() - t)
        conn.close()
        results.put(local)

    procs = [ctx.Process(target=run, args=(chunk,)) for chunk in per_client]
    for proc in procs:
        proc.start()
    ready.wait()
    start = time.perf_counter()
    go.set()
    times: list[float] = []
    for _ in procs:
        times.extend(results.get())
    wall = time.perf_counter() - start
    for proc in procs:
        proc.join()
    p50, p95 = percentiles(times)
    return p50, p95, len(times) / wall


def interleaved(url: str, ef: int, ids: list[int], queries: dict[str, Query],
                repeats: int = 3) -> dict[str, tuple[float, ...]]:
    """One client per query kind, taking turns on the same ids (each ``repeats`` times), so each kind
    sees the same machine load (this box is shared). Per kind: (p50 ms, p95 ms over every run,
    queries/s from the mean latency, ratio to the first kind): the ratio is the median over the ids
    of the kind's fastest run over the reference's fastest run for the same query vector, which
    leaves out most of the time spent waiting for a core the other processes hold."""
    conns = {name: connect(url, ef) for name in queries}
    times: dict[str, list[float]] = {name: [] for name in queries}
    best: dict[str, list[float]] = {name: [] for name in queries}
    for name, query in queries.items():
        query(conns[name], ids[0])
    names = list(queries)
    for n, i in enumerate(ids):
        fastest = dict.fromkeys(names, float("inf"))
        for r in range(repeats):
            turn = (n + r) % len(names)
            for name in names[turn:] + names[:turn]:
                t = time.perf_counter()
                queries[name](conns[name], i)
                elapsed = time.perf_counter() - t
                times[name].append(elapsed)
                fastest[name] = min(fastest[name], elapsed)
        for name in names:
            best[name].append(fastest[name])
    for conn in conns.values():
        conn.close()
    reference = np.array(best[names[0]])
    return {name: (*percentiles(xs), len(xs) / sum(xs), float(np.median(np.array(best[name]) / reference)))
            for name, xs in times.items()}


def recall(url: str, ef: int, vectors: np.ndarray, ids: list[int], sql: str, extra: tuple = (),
           mask: np.ndarray | None = None, as_id: Callable[[object], int] = lambda r: int(r) - 1) -> tuple[float, float]:
    """(recall@10, mean rows returned) of ``sql`` against exact search."""
    hits = rows = 0
    with connect(url, ef) as conn:
        for i in ids:
            params = (TENANT, vectors[i], *extra) if sql.count("%s") > 1 else (vectors[i],)
            got = [as_id(r[0]) for r in conn.execute(sql, params).fetchall()]
            rows += len(got)
            hits += len(set(got) & exact_topk(vectors, vectors[i], 10, mask))
    return hits / (10 * len(ids)), rows / len(ids)


def by_external_id(r: object) -> int:
    return int(str(r)[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--ef", type=int, nargs="+", default=[40, 100])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--workers", type=int, default=1,
                    help="max_parallel_maintenance_workers for the index builds (2 cores here: leader + 1)")
    ap.add_argument("--maintenance-work-mem", default="2GB")
    ap.add_argument("--m", type=int, default=DEFAULT_GRAPH.m,
                    help="HNSW m of the global index (default: the project's; pgvector's is 16)")
    ap.add_argument("--ef-construction", type=int, default=DEFAULT_GRAPH.ef_construction,
                    help="HNSW ef_construction of the global index (default: the project's; pgvector's is 64)")
    ap.add_argument("--grouped", action="store_true", help="also measure per-category partial HNSW indexes")
    ap.add_argument("--halfvec", action="store_true", help="also measure a halfvec(512) HNSW index")
    ap.add_argument("--filtered-queries", type=int, default=50,
                    help="queries per category-filtered measurement (a 20 %% category off the global graph is slow)")
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
        gen_s = time.perf_counter() - t
        with psycopg.connect(url, autocommit=True) as conn:
            register_vector(conn)
            conn.execute("SET statement_timeout = 0")
            conn.autocommit = False
            t = time.perf_counter()
            load(conn, vectors, cats)
            load_s = time.perf_counter() - t
            conn.autocommit = True
            conn.execute(f"SET maintenance_work_mem = '{args.maintenance_work_mem}'")
            build_s = build_index(conn, f"ix_embeddings_image_embedding_{DIMS}_hnsw",
                                  f"(image_embedding::vector({DIMS})) vector_cosine_ops", f"dims = {DIMS}",
                                  args.workers, (args.m, args.ef_construction))
            t = time.perf_counter()
            conn.execute("VACUUM ANALYZE")
            vacuum_s = time.perf_counter() - t
            global_mb = index_mb(conn, f"ix_embeddings_image_embedding_{DIMS}_hnsw")
        names = list(CATEGORIES)
        big, rare = names[1], names[-1]
        masks = {c: cats == names.index(c) for c in (big, rare)}
        print(f"N={args.n} dims={DIMS} categories={len(CATEGORIES)} '{big}'={masks[big].sum()} rows, rare "
              f"'{rare}'={masks[rare].sum()} rows ({masks[rare].mean():.2%}); vectors {gen_s:.1f}s; "
              f"load {load_s:.1f}s; HNSW build (m={args.m}, ef_construction={args.ef_construction}, maintenance_work_mem="
              f"{args.maintenance_work_mem}, max_parallel_maintenance_workers={args.workers}) {build_s:.1f}s, "
              f"{global_mb:.0f} MB; VACUUM ANALYZE {vacuum_s:.1f}s; as role {READER}")

        queries = rng.choice(args.n, size=args.queries, replace=False).tolist()
        filtered_queries = queries[:args.filtered_queries]
        print("latency: p50 / p95 ms from one client (3 runs per query); (Nx): median over the queries of the "
              "function's fastest run over the bare scan's fastest run for the same query, taking turns")
        print(f"{'ef':>4} | {'recall fn/bare':>14} | {'bare p50/p95 ms':>15} | {'search_by_embedding':>25} | "
              f"{'similar_products':>25} | q/s 1 -> {args.clients} clients (x): bare, search, similar")
        for ef in args.ef:
            fn_recall, _ = recall(url, ef, vectors, queries, SEARCH, as_id=by_external_id)
            bare_recall, _ = recall(url, ef, vectors, queries, BARE)
            one = interleaved(url, ef, queries, {
                "bare": lambda c, i: c.execute(BARE, (vectors[i],)).fetchall(),
                "search": lambda c, i: c.execute(SEARCH, (TENANT, vectors[i])).fetchall(),
                "similar": lambda c, i: c.execute(SIMILAR, (TENANT, f"p{i}")).fetchall()})
            bare, search, similar = one["bare"], one["search"], one["similar"]
            many = queries * 2
            kinds = {"bare": lambda c, i: c.execute(BARE, (vectors[i],)).fetchall(),
                     "search": lambda c, i: c.execute(SEARCH, (TENANT, vectors[i])).fetchall(),
                     "similar": lambda c, i: c.execute(SIMILAR, (TENANT, f"p{i}")).fetchall()}
            # the same closed loop (processes, warm sessions, a common start) with one client and with many
            scaling = {kind: (timed(url, ef, many, 1, q)[2], timed(url, ef, many, args.clients, q)[2])
                       for kind, q in kinds.items()}
            print(f"{ef:>4} | {fn_recall:>6.3f}/{bare_recall:<7.3f} | {bare[0]:>6.2f} / {bare[1]:>6.2f} | "
                  f"{search[0]:>6.2f} / {search[1]:>6.2f} ({search[3]:.2f}x) | "
                  f"{similar[0]:>6.2f} / {similar[1]:>6.2f} ({similar[3]:.2f}x) | "
                  + ", ".join(f"{one_q:.0f} -> {many_q:.0f} ({many_q / one_q:.2f}x)"
                              for one_q, many_q in scaling.values()))

        def filtered(label: str) -> None:
            ef = args.ef[0]
            for category in (big, rare):
                rec, rows = recall(url, ef, vectors, filtered_queries, SEARCH_IN, (category,), masks[category],
                                   as_id=by_external_id)
                p50, p95, _ = timed(url, ef, filtered_queries, 1,
                                    lambda c, i, cat=category: c.execute(SEARCH_IN, (TENANT, vectors[i], cat)).fetchall())
                print(f"  {label:>22} | category={category:<6} | rows {rows:>4.1f}/10 | recall {rec:.3f} | "
                      f"p50/p95 {p50:.2f} / {p95:.2f} ms (ef_search {ef})")

        print("filtered search_by_embedding (queries from random products, mostly of other categories):")
        filtered("one global index")
        if args.grouped:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(f"SET maintenance_work_mem = '{args.maintenance_work_mem}'")
                grouped_s = sum(build_index(conn, f"ix_bench_{c}_hnsw", f"(image_embedding::vector({DIMS})) "
                                            "vector_cosine_ops", f"dims = {DIMS} AND category = '{c}'", args.workers)
                                for c in names)
                conn.execute("ANALYZE embeddings")
                grouped_mb = index_mb(conn, "ix_bench_%_hnsw")
            print(f"  per-category partial HNSW indexes ({len(names)}): build {grouped_s:.1f}s, {grouped_mb:.0f} MB "
                  f"(global: {build_s:.1f}s, {global_mb:.0f} MB)")
            filtered("+ per-category indexes")
            bare_rec, _ = recall(url, args.ef[0], vectors, queries, BARE)
            one = interleaved(url, args.ef[0], queries, {
                "bare": lambda c, i: c.execute(BARE, (vectors[i],)).fetchall(),
                "search": lambda c, i: c.execute(SEARCH, (TENANT, vectors[i])).fetchall()})
            bare, search = one["bare"], one["search"]
            print(f"  unfiltered with per-category indexes present: bare p50 {bare[0]:.2f} ms (recall {bare_rec:.3f}), "
                  f"search_by_embedding p50 {search[0]:.2f} ms ({search[3]:.2f}x)")
        if args.halfvec:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(f"SET maintenance_work_mem = '{args.maintenance_work_mem}'")
                half_s = build_index(conn, "ix_bench_halfvec_hnsw", f"(image_embedding::halfvec({DIMS})) "
                                     "halfvec_cosine_ops", f"dims = {DIMS}", args.workers)
                half_mb = index_mb(conn, "ix_bench_halfvec_hnsw")
            print(f"halfvec(512) HNSW index: build {half_s:.1f}s, {half_mb:.0f} MB (vector: {build_s:.1f}s, "
                  f"{global_mb:.0f} MB)")
            for ef in args.ef:
                v_rec, _ = recall(url, ef, vectors, queries, BARE)
                h_rec, _ = recall(url, ef, vectors, queries, BARE_HALF)
                one = interleaved(url, ef, queries, {
                    "vector": lambda c, i: c.execute(BARE, (vectors[i],)).fetchall(),
                    "halfvec": lambda c, i: c.execute(BARE_HALF, (vectors[i],)).fetchall()})
                v, h = one["vector"], one["halfvec"]
                print(f"  ef {ef:>4}: vector recall {v_rec:.3f}, p50/p95 {v[0]:.2f} / {v[1]:.2f} ms | "
                      f"halfvec recall {h_rec:.3f}, p50/p95 {h[0]:.2f} / {h[1]:.2f} ms ({h[3]:.2f}x)")


if __name__ == "__main__":
    main()
