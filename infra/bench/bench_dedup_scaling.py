"""Dedup cost per product against catalogue size (issue 16, section 2; a benchmark, not a test).

One tenant's catalogue of N images (1k, 10k, 100k) in a throwaway embedded PostgreSQL+pgvector.
``--photos`` real photos of the train split are stored as originals; every catalogue row is one of
them with a few bits of each stored hash flipped (look-alike photos, as one merchant's shots on one
background are), pointing at that photo's original, so the tenant's nearest hashes are real
photos that verification must decode and match. Each product is a re-encoded 70 % copy of a random
one of those photos, deduplicated with the fetch stage's own functions, as ``enrich_worker`` in
the tenant's scope:

* ``sql``: ``db.repositories.images.near_candidates`` (exact scan of the tenant's rows below
  ``EXACT_SCAN_MAX_IMAGES``, as in production), in *wall* milliseconds (it runs in the server);
* ``load``: each candidate's local features (``tasks.pipeline.dedup_features.load``) in a fresh
  process (empty cache), two ways: **before**, features not persisted (the original is read from
  blob storage, decoded and ORB-extracted: what every cache miss cost before), and **after**, read
  back from the features the fetch stage now writes beside each original at ingest;
* ``match``: ``NearDuplicateVerifier.match_features`` over the candidates.

CPU milliseconds per product for ``load`` and ``match`` (process time; the box is shared, wall time
is noisier), mean over ``--products`` products; the totals add the ``sql`` wall time. Before this change a worker's LRU (4,096 images) made a 1k catalogue
cheap once warm; a catalogue past the cache pays ``load before`` on nearly every candidate,
which is what made the stage slow down as the catalogue grew.

    .venv/bin/python infra/bench/bench_dedup_scaling.py --sizes 1000 10000 --products 8 --photos 150  # ~5 min
    .venv/bin/python infra/bench/bench_dedup_scaling.py      # 1k, 10k, 100k: the 100k load is slow
    .venv/bin/python infra/bench/bench_dedup_scaling.py --without-hash-indexes  # the same, loaded in seconds (100k: 7 s)

The rows go in through COPY with every index live, as the pipeline writes them; the eight HNSW
hash indexes make that about 35 rows/s on a loaded 2-core box, so the 100k step takes most of an
hour there.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import structlog
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from db.repositories import images  # noqa: E402
from models.dedup import CANDIDATE_K, CANDIDATE_MAX_HAMMING  # noqa: E402
from models.hashing import CandidateHashes, candidate_hashes, sha256_hex  # noqa: E402
from models.images import ImageLimits, decode_image  # noqa: E402
from tasks.io.blobs import LocalBlobStore, original_key  # noqa: E402
from tasks.pipeline import dedup_features  # noqa: E402
from tasks.runtime import Runtime  # noqa: E402

TENANT = "bench"
DATASET = ROOT.parent / "shared" / "datasets" / "clothing-small"
COLUMNS = ("tenant_id", "sha256", "phash", "dhash", "phash_trimmed", "dhash_trimmed", "phash_centre",
           "dhash_centre", "width", "height", "byte_size", "format", "storage_uri")


def _flip(bits: str, rng: random.Random, lo: int = 4, hi: int = 12) -> str:
    out = list(bits)
    for i in rng.sample(range(64), rng.randint(lo, hi)):
        out[i] = "1" if out[i] == "0" else "0"
    return "".join(out)


def _copy(data: bytes) -> Image.Image:
    img = decode_image(data).image
    small = img.resize((img.width * 7 // 10, img.height * 7 // 10), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=80)
    return decode_image(buf.getvalue()).image


def _rows(start: int, stop: int, photos: list[tuple[str, CandidateHashes, Image.Image]],
          rng: random.Random) -> str:
    lines = []
    for i in range(start, stop):
        uri, h, img = photos[i % len(photos)]
        sha = sha256_hex(f"bench-row-{i}".encode())
        values = [TENANT, sha, *(_flip(getattr(getattr(h, part), kind), rng)
                                 for part in ("plain", "trimmed", "centre") for kind in ("phash", "dhash")),
                  str(img.width), str(img.height), "1", "JPEG", uri]
        lines.append("\t".join(values))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    ap.add_argument("--products", type=int, default=12, help="products deduplicated per size")
    ap.add_argument("--photos", type=int, default=400, help="real photos behind the catalogue rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--without-hash-indexes", action="store_true",
                    help="drop the images table's HNSW hash indexes before loading (seconds instead of most of an "
                         "hour at 100k): a tenant below EXACT_SCAN_MAX_IMAGES is searched by an exact scan that "
                         "reads none of them, so the measured dedup is the same")
    args = ap.parse_args(argv)
    cv2.setNumThreads(1)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    rng = random.Random(args.seed)

    import psycopg
    from sqlalchemy import text
    from sqlalchemy.orm import sessionmaker

    from db import migrate
    from db.embedded import start_embedded
    from db.engine import make_engine, tenant_session

    with open(DATASET / "manifest.csv", newline="") as fh:
        manifest = [r for r in csv.DictReader(fh) if r["split"] == "train"]
    chosen = rng.sample(manifest, min(args.photos, len(manifest)))

    with tempfile.TemporaryDirectory(prefix="bench-dedup-") as tmp:
        url = start_embedded(Path(tmp) / "pgdata")
        owner = make_engine(url, statement_timeout_ms=0)
        migrate.upgrade(owner)
        with owner.begin() as conn:
            conn.execute(text("INSERT INTO tenants (id) VALUES (:t)"), {"t": TENANT})
            if args.without_hash_indexes:
                if max(args.sizes) > images.EXACT_SCAN_MAX_IMAGES:
                    ap.error(f"--without-hash-indexes measures the exact scan: sizes up to {images.EXACT_SCAN_MAX_IMAGES}")
                dropped = conn.execute(text("SELECT indexname FROM pg_indexes WHERE tablename = 'images' "
                                            "AND indexdef ILIKE '%USING hnsw%'")).scalars().all()
                for name in dropped:
                    conn.execute(text(f'DROP INDEX "{name}"'))
                print(f"dropped {len(dropped)} HNSW hash indexes (the exact scan reads none of them)", flush=True)
        worker = make_engine(url, statement_timeout_ms=0, runtime_role="enrich_worker")
        factory = sessionmaker(bind=worker, expire_on_commit=False)
        blobs = LocalBlobStore(Path(tmp) / "blobs")

        t0 = time.perf_counter()
        photos, raw = [], []
        for r in chosen:
            data = (DATASET / r["path"]).read_bytes()
            uri = blobs.put(original_key(TENANT, sha256_hex(data)), data)
            img = decode_image(data).image
            photos.append((uri, candidate_hashes(img), img))
            raw.append(data)
        print(f"stored and hashed {len(photos)} real photos in {time.perf_counter() - t0:.1f}s", flush=True)
        queries = [_copy(raw[rng.randrange(len(raw))]) for _ in range(args.products)]
        query_hashes = [candidate_hashes(q) for q in queries]

        def runtime() -> Runtime:  # a fresh worker process: empty feature cache
            return Runtime(session_factory=factory, blobs=blobs, fetcher=None,  # type: ignore[arg-type]
                           publisher=None, image_limits=ImageLimits(),  # type: ignore[arg-type]
                           models_factory=None)  # type: ignore[arg-type]

        header = (f"{'images':>8} | {'cands':>5} {'sql':>7} | {'load before':>11} {'load after':>10} "
                  f"{'match':>7} | {'total before':>12} {'total after':>11} {'speed-up':>8} | "
                  f"{'confirmed':>9}")
        results = []
        size = 0
        psql = url.replace("postgresql+psycopg://", "postgresql://")
        for target in sorted(args.sizes):
            t0 = time.perf_counter()
            with psycopg.connect(psql) as conn, conn.cursor() as cur:
                with cur.copy(f"COPY images ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                    for start in range(size, target, 10_000):
                        copy.write(_rows(start, min(target, start + 10_000), photos, rng))
                cur.execute("ANALYZE images")
            size = target
            print(f"catalogue at {size} images (loaded in {time.perf_counter() - t0:.1f}s)", flush=True)
            shutil.rmtree(Path(tmp) / "blobs" / "features", ignore_errors=True)  # nothing persisted: "before"
            per = {"sql": [], "before": [], "after": [], "match": [], "cands": [], "confirmed": 0}
            for phase in ("before", "after"):
                rt = runtime()
                verifier = rt.dedup_verifier
                for q, h in zip(queries, query_hashes, strict=True):
                    qf = verifier.features(q)
                    c0, w0 = time.process_time(), time.perf_counter()
                    with tenant_session(factory, TENANT) as s:
                        found = images.near_candidates(
                            s, TENANT, -1, phash=h.plain.phash, dhash=h.plain.dhash, k=CANDIDATE_K,
                            max_hamming=CANDIDATE_MAX_HAMMING, trimmed=(h.trimmed.phash, h.trimmed.dhash),
                            mirrored=(h.mirrored.phash, h.mirrored.dhash),
                            centre=(h.centre.phash, h.centre.dhash))
                    c1, w1 = time.process_time(), time.perf_counter()
                    feats = [dedup_features.load(rt, TENANT, c.image_id, c.sha256, c.storage_uri)
                             for c in found]
                    c2 = time.process_time()
                    matches = [verifier.match_features(qf, f, image_id=c.image_id, hamming=c.hamming)
                               for c, f in zip(found, feats, strict=True)]
                    c3 = time.process_time()
                    per[phase].append((c2 - c1) * 1000)
                    if phase == "after":
                        per["sql"].append((w1 - w0) * 1000)  # wall: the scan runs in the server process
                        per["match"].append((c3 - c2) * 1000)
                        per["cands"].append(len(found))
                        per["confirmed"] += any(m.confirmed for m in matches)
            n = len(queries)
            mean = {k: sum(per[k]) / n for k in ("sql", "before", "after", "match", "cands")}
            before = mean["sql"] + mean["before"] + mean["match"]
            after = mean["sql"] + mean["after"] + mean["match"]
            results.append((size, mean, before, after, per["confirmed"]))
            print(f"  {size} images: {mean['cands']:.1f} candidates, sql {mean['sql']:.1f} ms, load before "
                  f"{mean['before']:.1f} / after {mean['after']:.1f} ms, match {mean['match']:.1f} ms CPU per "
                  f"product", flush=True)
        print()
        print(f"dedup ms per product (load and match: CPU; sql: wall; mean of {len(queries)} products; k={CANDIDATE_K} per hash kind, "
              f"radius {CANDIDATE_MAX_HAMMING}; fresh process cache; {len(photos)} real photos behind the "
              f"rows)")
        print(header)
        print("-" * len(header))
        for size, mean, before, after, confirmed in results:
            print(f"{size:>8} | {mean['cands']:>5.1f} {mean['sql']:>7.1f} | {mean['before']:>11.1f} "
                  f"{mean['after']:>10.1f} {mean['match']:>7.1f} | {before:>12.1f} {after:>11.1f} "
                  f"{before / after:>7.1f}x | {confirmed:>4}/{len(queries)}")
        first, last = results[0], results[-1]
        print(f"\nafter: {last[3]:.1f} ms at {last[0]} images vs {first[3]:.1f} ms at {first[0]} "
              f"({last[3] / first[3]:.2f}x); of which the candidate search {last[1]['sql']:.1f} vs "
              f"{first[1]['sql']:.1f} ms")
        worker.dispose()
        owner.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
