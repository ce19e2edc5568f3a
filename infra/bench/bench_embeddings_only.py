"""Embeddings-only path against its peers (issue 16, section 3), side by side in one run.

On the same photos (the first ``--photos`` of the shared clothing dataset, read in place), the same
architecture (open_clip ViT-B-32, random init: compute, not quality) and the same batch size:

* **bare model**: ``encode_image`` on tensors preprocessed beforehand, in this process;
* **pipeline**: product events through RabbitMQ to real worker processes (events+cpu, gpu) for an
  embeddings-only tenant (``ENRICH_ENRICHMENT__TENANTS``: dedup + embeddings): fetch, exact and near
  dedup, CLIP of every photo, vectors upserted to Postgres/pgvector, ``product.indexed`` published;
  timed from the first publish to the last ``product.indexed`` on the backend's queue, after a
  warm-up event (model load outside the timing);
* **Pixeltable** 0.7.21: its CLIP UDF (transformers ``CLIPModel`` at ViT-B/32's sizes, random init,
  batch 32 as the UDF declares) as the embedding index of a table (pgvector in its own store),
  timed over one ``insert`` of every photo after a one-photo warm-up;
* **clip-retrieval** 2.45.0: its batch inference (``clip_inference``, files input, images only),
  the second of two runs in one process (the first loads the model).

The peers run as subprocesses of their own virtual environments (``--pixeltable-python``,
``--clip-retrieval-python``), never the project's. Every system gets ``--threads`` torch threads (the pipeline's model worker;
its events/CPU worker runs two prefork children with the default one thread each). The pipeline's
CPU time is read per worker process tree over the timed window and printed per photo.

    .venv/bin/python infra/bench/bench_embeddings_only.py --photos 600 --batch-size 32 \\
        --pixeltable-python /tmp/h/peers-venv/bin/python --clip-retrieval-python /tmp/h/peers-cr-venv/bin/python
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
DATASET = REPO.parent / "shared" / "datasets" / "clothing-small"
PEERS = Path(__file__).resolve().parent / "peers"
TENANT = "bench-embeddings"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def photo_list(n: int) -> list[tuple[Path, str]]:
    with open(DATASET / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))[:n]
    return [(DATASET / r["path"], r["category"]) for r in rows]


def prepare(work: Path, photos: list[tuple[Path, str]]) -> tuple[Path, Path, Path]:
    """The photo list (Pixeltable), a folder of symlinks to them (clip-retrieval reads a folder; the
    photos themselves stay where they are) and a random-init ViT-B-32 checkpoint file."""
    import open_clip
    import torch

    listing = work / "photos.txt"
    listing.write_text("".join(f"{p}\n" for p, _ in photos))
    folder = work / "folder"
    folder.mkdir(exist_ok=True)
    for i, (p, _) in enumerate(photos):
        link = folder / f"{i:05d}{p.suffix.lower()}"
        if not link.exists():
            link.symlink_to(p)
    checkpoint = work / "vitb32_random.pt"
    if not checkpoint.exists():
        torch.manual_seed(0)
        model, _, _ = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
        torch.save(model.state_dict(), checkpoint)
    return listing, folder, checkpoint


def bare(photos: list[tuple[Path, str]], batch: int, threads: int) -> dict[str, Any]:
    import open_clip
    import torch
    from PIL import Image

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    model.eval()
    tensors = torch.stack([preprocess(Image.open(p).convert("RGB")) for p, _ in photos])  # ready tensors
    with torch.inference_mode():
        model.encode_image(tensors[:batch])  # warm-up
        started, cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(tensors), batch):
            model.encode_image(tensors[i:i + batch])
        seconds, cpu_s = time.perf_counter() - started, time.process_time() - cpu
    return {"system": "bare encode_image", "photos": len(photos), "seconds": seconds,
            "items_per_s": len(photos) / seconds, "cpu_ms_per_item": {"bare": cpu_s * 1000 / len(photos)}}


def pipeline(photos: list[tuple[Path, str]], batch: int, threads: int, profile: str) -> dict[str, Any]:
    import pika

    from db import migrate
    from db.embedded import start_embedded
    from db.engine import make_engine
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_pipeline import CpuMeter
    from run_sustained import Answers, consume
    from tasks.events import product_event_payload
    from tests.integration.harness import AMQP_URL, Deployment, base_env, require_service

    require_service(5672, "RabbitMQ", "start it (infra/scripts/services.sh)")
    work = Path(tempfile.mkdtemp(prefix="bench-embeddings-"))
    url = start_embedded(work / "pgdata")
    engine = make_engine(url, pool_size=2, statement_timeout_ms=0)
    migrate.upgrade(engine)
    ns = f"e{uuid.uuid4().hex[:8]}"
    (work / "data").mkdir()
    env = base_env(pg_url=url, data_dir=work / "data", namespace=ns, ENRICH_MODELS__PROFILE=profile,
                   ENRICH_ENRICHMENT__TENANTS=json.dumps({TENANT: ["dedup", "embeddings"]}),
                   ENRICH_WORKERS__BATCH_SIZE=str(batch), ENRICH_WORKERS__BATCH_MAX_WAIT_MS="200")
    dep = Deployment(env=env, data_dir=work / "data", namespace=ns, engine=engine)
    answers, stop = Answers(), threading.Event()

    def event(external_id: str, path: Path, category: str) -> dict[str, Any]:
        return product_event_payload(tenant_id=TENANT, merchant_id="m1", external_id=external_id, version=1,
                                     category=category, image_urls=[path.as_uri()], title=f"{category} {external_id}",
                                     attributes={"brand": "Acme"})
    try:
        # The model worker gets the peers' torch threads; the events/CPU worker keeps the default thread
        # budget (one per prefork child: its two children already fill the two cores).
        meter = CpuMeter({"events,cpu": dep.start_worker("events,cpu"),
                          "gpu": dep.start_worker("gpu", extra_env={"ENRICH_WORKERS__CPU_THREADS": str(threads)})})
        threading.Thread(target=consume, args=(ns, answers, stop), daemon=True).start()
        warm = REPO.parent / "shared" / "datasets" / "clothing-small"
        warm_photo = next(p for p in sorted((warm / "validation").rglob("*.jpg")))
        dep.publish(event("warm-up", warm_photo, "shirt"))
        deadline = time.monotonic() + 900
        while answers.count() < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        log("pipeline: warm-up answered (models loaded)")
        conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        ch = conn.channel()
        ch.confirm_delivery()
        started, cpu0 = time.monotonic(), meter.sample()
        for i, (path, category) in enumerate(photos):
            payload = event(f"p{i}", path, category)
            ch.basic_publish(exchange=f"{ns}.events", routing_key=payload["event_type"], body=json.dumps(payload).encode(),
                             properties=pika.BasicProperties(content_type="application/json", delivery_mode=2,
                                                             message_id=payload["event_id"]))
        conn.close()
        deadline = time.monotonic() + 3600
        while answers.count() < len(photos) + 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        seconds, cpu1 = time.monotonic() - started, meter.sample()
        from sqlalchemy import text

        with engine.connect() as c:
            vectors = c.execute(text("SELECT count(*) FROM photo_embeddings")).scalar_one()
            exact, near = c.execute(text("SELECT count(*) FILTER (WHERE method = 'exact'), "
                                         "count(*) FILTER (WHERE method <> 'exact') FROM duplicate_members")).one()
            stages = c.execute(text(
                "SELECT avg((timings_ms->>'fetch')::float), avg((timings_ms->>'dedup')::float), "
                "avg((timings_ms->>'persist')::float) FROM enrichment_jobs WHERE status = 'done'")).one()
    finally:
        stop.set()
        dep.stop_workers()
        dep.delete_broker_objects()
    done = answers.count() - 1
    return {"system": f"pipeline ({profile}, dedup+embeddings, through the queue)", "photos": done,
            "seconds": seconds, "items_per_s": done / seconds, "photo_vectors": vectors, "exact_dups": exact,
            "near_dups": near, "answers": answers.kinds, "mean_fetch_ms": stages[0], "mean_dedup_ms": stages[1],
            "mean_persist_ms": stages[2],
            "cpu_ms_per_item": {role: (cpu1[role] - cpu0[role]) * 1000 / max(done, 1) for role in cpu0}}


def peer(cmd: list[str], name: str) -> dict[str, Any]:
    log(f"{name}: {' '.join(cmd[:2])} …")
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    # the peers' progress output may share the line: the result is the last JSON object printed
    last = proc.stdout.rfind('{"system"')
    if proc.returncode != 0 or last < 0:
        return {"system": name, "error": (proc.stderr or proc.stdout)[-1500:]}
    return json.loads(proc.stdout[last:].splitlines()[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", default="random-full", help="the pipeline's model profile (random-full: ViT-B-32)")
    ap.add_argument("--pixeltable-python", type=Path, default=Path("/tmp/h/peers-venv/bin/python"))
    ap.add_argument("--clip-retrieval-python", type=Path, default=Path("/tmp/h/peers-cr-venv/bin/python"))
    ap.add_argument("--only", default="bare,pipeline,pixeltable,clip-retrieval")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench-embeddings-only")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    photos = photo_list(args.photos)
    listing, folder, checkpoint = prepare(args.work, photos)
    only = set(args.only.split(","))
    results: list[dict[str, Any]] = []
    if "bare" in only:
        results.append(bare(photos, args.batch_size, args.threads))
        log(f"bare: {results[-1]['items_per_s']:.2f} items/s")
    if "pixeltable" in only:
        results.append(peer([str(args.pixeltable_python), str(PEERS / "pixeltable_clip.py"), "--photos", str(listing),
                             "--work", str(args.work / "pixeltable"), "--threads", str(args.threads)], "pixeltable"))
        log(f"pixeltable: {results[-1].get('items_per_s', results[-1].get('error'))}")
    if "clip-retrieval" in only:
        results.append(peer([str(args.clip_retrieval_python), str(PEERS / "clip_retrieval_infer.py"), "--folder",
                             str(folder), "--checkpoint", str(checkpoint), "--work", str(args.work / "clip-retrieval"),
                             "--batch-size", str(args.batch_size), "--threads", str(args.threads)], "clip-retrieval"))
        log(f"clip-retrieval: {results[-1].get('items_per_s', results[-1].get('error'))}")
    if "pipeline" in only:
        results.append(pipeline(photos, args.batch_size, args.threads, args.profile))
        log(f"pipeline: {results[-1]['items_per_s']:.2f} items/s")
    by = {r["system"].split(" ")[0]: r for r in results}
    ours = next((r for r in results if r["system"].startswith("pipeline")), None)
    print(f"\n{len(photos)} photos, batch {args.batch_size}, {args.threads} torch threads, ViT-B-32 random init\n")
    print("| system | items/s | seconds | pipeline ÷ this |")
    print("| --- | ---: | ---: | ---: |")
    for r in results:
        if "error" in r:
            print(f"| {r['system']} | — | — | failed: {r['error'].splitlines()[-1][:120]} |")
            continue
        ratio = f"{ours['items_per_s'] / r['items_per_s']:.2f}×" if ours and r is not ours else "—"
        print(f"| {r['system']} | {r['items_per_s']:.2f} | {r['seconds']:.1f} | {ratio} |")
    print("\nCPU milliseconds per photo (every thread of the process; the pipeline's by worker process tree):")
    for r in results:
        if "cpu_ms_per_item" in r:
            parts = ", ".join(f"{role} {ms:.1f}" for role, ms in r["cpu_ms_per_item"].items())
            # "<role>:main" is the tree's main process alone, already inside its tree's figure
            whole = sum(ms for role, ms in r["cpu_ms_per_item"].items() if not role.endswith(":main"))
            print(f"  {r['system']}: {parts} (all: {whole:.1f})")
    if ours and "mean_dedup_ms" in ours:
        print(f"  pipeline stage wall time per product (means): fetch {ours['mean_fetch_ms']:.1f} ms, dedup "
              f"{ours['mean_dedup_ms']:.1f} ms, persist {ours['mean_persist_ms']:.1f} ms")
    summary = {"photos": len(photos), "batch_size": args.batch_size, "threads": args.threads, "results": results,
               "random_weights": True, "targets": {"vs_pixeltable": 1.0, "vs_bare": 0.85}}
    if ours and "pixeltable" in by and "items_per_s" in by["pixeltable"]:
        summary["pipeline_vs_pixeltable"] = ours["items_per_s"] / by["pixeltable"]["items_per_s"]
    if ours and "bare" in by:
        summary["pipeline_vs_bare"] = ours["items_per_s"] / by["bare"]["items_per_s"]
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
