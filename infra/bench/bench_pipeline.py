"""End-to-end pipeline benchmark (not a test).

Publishes N product events for real photos through RabbitMQ, runs real worker processes (events+cpu
and gpu) against a fresh embedded Postgres, and measures events/s and the event → listing.enriched
latency (p50/p95) as seen by a plain AMQP consumer. It then runs the bare model stages in-process
on the same photos at the same batch size and prints the pipeline's ratio to that bare throughput.

What the orchestration costs, per product, over the timed run (warm-up excluded):

* CPU-milliseconds of every worker process (main process, prefork children alive or reaped) and
  of ``enrich beat`` (``--beat on``, the default; the periodic relay and reconciler it schedules
  run in the events/CPU worker), in all and by role, beside the model compute per product (the
  bare run's CPU time per product at the same thread budget): the difference is the cost outside
  the models;
* the same CPU by part (``cpu_ms_per_product_by_part``): the events worker's main process (intake,
  Celery's consumer and pool), each stage task's own thread (``stage.ran``'s ``cpu_ms``), the outbox
  relays after the stages (``relay_cpu_ms``), the gpu worker's model thread (``batch.done``'s
  ``cpu_ms``), and what is left of each worker (Celery's prefork children outside the stage bodies;
  the gpu worker's consumer, heartbeats and batcher hand-offs);
* beside the workers, on the same box (``cpu_ms_per_product_beside_workers``): the embedded
  Postgres (postmaster and backends), RabbitMQ (the Erlang VM) and this driver (publisher and
  consumer); and the whole machine (``box_cpu_ms_per_product``, every core's non-idle time, and
  ``box_busy_share``, that time over wall time × cores from the first event to the last listing:
  near 1.0, the box is full and every millisecond cut anywhere is throughput);
* database transactions (``pg_stat_database`` commits + rollbacks of the catalog database);
* broker messages: Celery task messages the workers executed (their ``succeeded``/``retry``/
  ``raised`` log lines, by task), plus the product event in and the listing event out;
* the gpu worker's model thread, from its ``batch.done`` lines: batches and their mean size, the
  share of the window it spent inside a batch, and its idle time between batches.

    .venv/bin/python infra/bench/bench_pipeline.py --n 64 --batch-size 8 --profile tiny
    .venv/bin/python infra/bench/bench_pipeline.py --n 32 --profile random-full --device cuda   # on a GPU

Each timed window (``--rounds``, each for a fresh tenant, so nothing is deduplicated or reused
across rounds) is followed by its own bare runs, each in its own interpreter (OpenMP reads its wait
policy once, when torch loads), because this shared box drifts in speed by a third over minutes:

* at the workers' thread budget (``--cpu-threads``, torch and OpenCV alike), with passive waits
  (the workers' default, ``workers/__init__.py``: the model's CPU per product like for like with the
  workers') and with spinning waits; the faster of the two is the throughput reference;
* spinning on every core (torch's default threads): what the model alone makes of the machine.

Before 2026-12-02 the bare run set its thread limit before torch was imported, so it ran on every
core while the pipeline's model ran on one, and every ratio printed until then was taken against
that whole-machine run.

Random weights (tiny / random-full) measure compute, not quality.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.integration.harness import AMQP_URL, Deployment, base_env, require_service  # noqa: E402
from models.config import mask_fill_threads  # noqa: E402 - light (no model libraries)


def photos(n: int) -> list[tuple[Path, str]]:
    root = REPO.parent / "shared" / "datasets" / "clothing-small"
    with open(root / "manifest.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "validation"]
    return [(root / r["path"], r["category"]) for r in rows[:n]]


def bare_model_throughput(items: list[tuple[Path, str]], batch: int, profile: str, device: str,
                          max_new_tokens: int, grammar_threads: int = 0,
                          grammar_overlap: bool = True) -> tuple[float, float, float]:
    """(items/s, CPU seconds per item, this thread's own CPU seconds per item: the model thread's
    share, without the grammar fill threads) of the GPU worker's batch function in this process,
    timed after a warm-up (weights loaded, every category's grammars compiled)."""
    from models.factory import ModelConfig, build_models
    from models.images import ImageLimits, load_image_file
    from models.batch import ModelItem, run_model_batch

    bundle = build_models(ModelConfig(profile=profile, device=device, max_new_tokens=max_new_tokens,
                                      grammar_threads=grammar_threads, grammar_overlap=grammar_overlap,
                                      cache_dir=Path(tempfile.mkdtemp())))
    decoded = [load_image_file(p, ImageLimits()).image for p, _ in items]
    work = [ModelItem(job_id=i, image=img, category=cat, title=f"{cat} {i}", description="Photographed on a hanger.",
                      attributes={"brand": "Acme"}, locale="en") for i, (img, (_, cat)) in enumerate(zip(decoded, items))]
    # Warm-up: load the weights and compile every timed category's grammars (the pipeline's
    # warm-up does the same), so that neither side's timing pays a first compile.
    warm = list({item.category: item for item in work}.values())
    for i in range(0, len(warm), batch):
        run_model_batch(bundle, warm[i:i + batch])
    start, cpu, own = time.perf_counter(), time.process_time(), time.thread_time()
    for i in range(0, len(work), batch):
        run_model_batch(bundle, work[i:i + batch])
    n = len(work)
    return n / (time.perf_counter() - start), (time.process_time() - cpu) / n, (time.thread_time() - own) / n


def tree_cpu(root) -> tuple[float, float]:  # noqa: ANN001 - a psutil.Process
    """(the process's own CPU seconds, its whole tree's): the process, its reaped children (as the
    kernel sums them into it) and its live descendants."""
    import psutil

    t = root.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in root.children(recursive=True):
        try:
            c = child.cpu_times()
            total += c.user + c.system
        except psutil.NoSuchProcess:
            continue
    return t.user + t.system, total


class CpuMeter:
    """Cumulative CPU seconds of each worker process tree (children reaped or alive), and of each
    tree's main process alone (``<role>:main``: for the events worker, intake and Celery's consumer
    and pool; the stages run in its prefork children)."""

    def __init__(self, procs: dict[str, object]) -> None:
        self.procs = procs

    def sample(self) -> dict[str, float]:
        import psutil

        out: dict[str, float] = {}
        for role, popen in self.procs.items():
            try:
                out[f"{role}:main"], out[role] = tree_cpu(psutil.Process(popen.pid))
            except psutil.NoSuchProcess:
                out[f"{role}:main"] = out[role] = float("nan")
        return out


class InfraMeter:
    """Cumulative CPU seconds of what the workers lean on, on the same box: the embedded Postgres
    (postmaster and every backend), RabbitMQ (the Erlang VM and its helpers), this driver process
    (publisher and consumer), and the whole machine's busy time (``box``: every CPU's non-idle time
    from ``/proc/stat``, in CPU-seconds; its share of wall time × cores says how full the box was)."""

    def __init__(self, pgdata: Path) -> None:
        import psutil

        self.postmaster = psutil.Process(int((pgdata / "postmaster.pid").read_text().split()[0]))
        self.broker = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "beam.smp"]
        self.driver = psutil.Process()

    @staticmethod
    def box() -> float:
        import psutil

        t = psutil.cpu_times()
        return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)

    def sample(self) -> dict[str, float]:
        own = self.driver.cpu_times()
        out = {"postgres": tree_cpu(self.postmaster)[1], "bench_driver": own.user + own.system, "box": self.box()}
        if self.broker:  # a broker on another host is not on this box: left out, not counted as 0
            out["rabbitmq"] = sum(tree_cpu(b)[1] for b in self.broker)
        return out


def bare_run(args: argparse.Namespace, omp_wait_policy: str, threads: int) -> dict[str, float]:
    """``bare_model_throughput`` in a fresh interpreter with the given OpenMP wait policy and torch
    threads (0: the library default, every core)."""
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), "--bare-only", "--n", str(args.n), "--batch-size",
           str(args.batch_size), "--profile", args.profile, "--device", args.device, "--max-new-tokens",
           str(args.max_new_tokens), "--cpu-threads", str(threads), "--grammar-threads", str(args.grammar_threads),
           "--grammar-overlap", args.grammar_overlap]
    done = subprocess.run(cmd, env={**os.environ, "OMP_WAIT_POLICY": omp_wait_policy}, capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bare run ({omp_wait_policy}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def transactions(engine) -> int:
    from sqlalchemy import text

    with engine.connect() as c:
        return int(c.execute(text("SELECT xact_commit + xact_rollback FROM pg_stat_database "
                                  "WHERE datname = current_database()")).scalar())


_TASK_LINE = re.compile(r"Task (\S+)\[[0-9a-f-]+\] (succeeded|retry|raised)")
_BATCH_LINE = re.compile(r"^(\S+)Z .*batch\.done (.*)$", re.M)
_STAGE_LINE = re.compile(r"^(\S+)Z .*stage\.ran (.*)$", re.M)
_FIELD = re.compile(r"(\w+)=([\d.]+)")
_STAGE = re.compile(r"stage=(\w+)")


def task_messages(data_dir: Path) -> dict[str, int]:
    """Task executions per task name, from every worker log (one broker message each)."""
    counts: dict[str, int] = {}
    for log in data_dir.glob("worker-*.log"):
        for m in _TASK_LINE.finditer(log.read_text(errors="replace")):
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return counts


def model_thread(data_dir: Path, start: float, end: float) -> dict[str, object]:
    """The gpu worker's model thread over a window (wall-clock seconds), from its ``batch.done``
    lines: batches, their mean size, the share of the window spent inside a batch, and the idle
    time between consecutive batches (what the thread waited for its next batch to fill)."""
    from datetime import UTC, datetime

    runs = []
    for log in data_dir.glob("worker-gpu*.log"):
        for m in _BATCH_LINE.finditer(log.read_text(errors="replace")):
            done = datetime.fromisoformat(m.group(1)).replace(tzinfo=UTC).timestamp()
            fields = {k: float(v) for k, v in _FIELD.findall(m.group(2))}
            took = fields["took_ms"] / 1000
            if start <= done - took and done <= end:
                cpu = fields.get("cpu_ms", float("nan")) / 1000  # absent from logs of older builds
                runs.append((done - took, done, int(fields["size"]), cpu))
    runs.sort()
    gaps = [b[0] - a[1] for a, b in zip(runs, runs[1:])]
    busy = sum(r[1] - r[0] for r in runs)
    items = sum(r[2] for r in runs)
    cpu = sum(r[3] for r in runs)
    return {"batches": len(runs), "mean_batch_size": round(items / max(1, len(runs)), 2),
            "busy_share": round(busy / max(1e-9, end - start), 3),
            "gap_ms_p50": round(statistics.median(gaps) * 1000, 1) if gaps else None,
            "gap_ms_total": round(sum(gaps) * 1000, 1),
            # the model thread's own CPU over its time inside batches, and per item (bare: the same)
            "cpu_share_in_batch": round(cpu / max(1e-9, busy), 3),
            "wall_ms_per_item": round(busy * 1000 / max(1, items), 1),
            "cpu_ms_per_item": round(cpu * 1000 / max(1, items), 1)}


def stage_cpu(data_dir: Path, start: float, end: float) -> dict[str, dict[str, float]]:
    """CPU seconds of the stage tasks that ended in a window, by stage, from their ``stage.ran``
    lines: the task thread's own (``cpu_ms``) and the relay's after it (``relay_cpu_ms``)."""
    from datetime import UTC, datetime

    out: dict[str, dict[str, float]] = {}
    for log in data_dir.glob("worker-*.log"):
        for m in _STAGE_LINE.finditer(log.read_text(errors="replace")):
            done = datetime.fromisoformat(m.group(1)).replace(tzinfo=UTC).timestamp()
            stage = _STAGE.search(m.group(2))
            if not (start <= done <= end) or stage is None:
                continue
            fields = {k: float(v) for k, v in _FIELD.findall(m.group(2))}
            acc = out.setdefault(stage.group(1), {"cpu_s": 0.0, "relay_cpu_s": 0.0, "runs": 0})
            acc["cpu_s"] += fields.get("cpu_ms", float("nan")) / 1000  # absent from logs of older builds
            acc["relay_cpu_s"] += fields.get("relay_cpu_ms", float("nan")) / 1000
            acc["runs"] += 1
    return out


def timed_round(dep, meter, infra, engine, tmp: Path, ns: str, items: list[tuple[Path, str]], *,  # noqa: ANN001
                tenant: str) -> dict[str, object]:
    """Publish one product event per photo for a fresh tenant (nothing to deduplicate against or
    reuse) and time the window until every ``listing.enriched`` is back; the counters around it."""
    import pika

    from tasks.events import product_event_payload

    cpu0, xact0, tasks0 = meter.sample(), transactions(engine), task_messages(tmp)
    infra0 = infra.sample()
    sent: dict[str, float] = {}
    start, wall_start = time.monotonic(), time.time()
    for i, (path, cat) in enumerate(items):
        p = product_event_payload(tenant_id=tenant, merchant_id="m", external_id=f"p{i}", version=1,
                                  category=cat, image_urls=[path.as_uri()], title=f"{cat} {i}",
                                  description="Photographed on a hanger.", attributes={"brand": "Acme"})
        sent[p["event_id"]] = time.monotonic()
        dep.publish(p)
    latencies, seen = [], set()
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    ch = conn.channel()
    deadline = time.monotonic() + 3600
    while len(seen) < len(items) and time.monotonic() < deadline:
        method, _props, body = ch.basic_get(f"{ns}.listing-events", auto_ack=True)
        if method is None:
            time.sleep(0.05)
            continue
        msg = json.loads(body)
        cid = msg["causation_id"]
        if cid in sent and cid not in seen:
            seen.add(cid)
            latencies.append(time.monotonic() - sent[cid])
    conn.close()
    elapsed, wall_end, box_end = time.monotonic() - start, time.time(), infra.box()
    time.sleep(2)  # the last relay and acks
    cpu1, xact1, tasks1 = meter.sample(), transactions(engine), task_messages(tmp)
    infra1 = infra.sample()
    return {"published": len(items), "seen": len(seen), "elapsed": elapsed, "latencies": latencies,
            "cpu_s": {role: cpu1[role] - cpu0[role] for role in cpu0}, "transactions": xact1 - xact0,
            "infra_cpu_s": {k: infra1[k] - infra0[k] for k in infra0},
            # every core's busy time from the first event published to the last listing seen
            "box_busy_share": (box_end - infra0["box"]) / (elapsed * (os.cpu_count() or 1)),
            "tasks": {name: tasks1.get(name, 0) - tasks0.get(name, 0) for name in tasks1},
            "model_thread": model_thread(tmp, wall_start, wall_end),
            "stages": stage_cpu(tmp, wall_start, wall_end + 2)}


def cpu_by_part(r: dict[str, object], done: int) -> dict[str, float]:
    """Where the workers' CPU per product went: the events worker's main process (intake, Celery's
    consumer and pool), each stage task's own thread, the relays after them, the gpu worker's
    model thread, the rest of the gpu worker (its consumer, claim heartbeats, the batcher's
    hand-offs: what no task or model thread accounts for), and beat's process when it runs."""
    stages, cpu = r["stages"], r["cpu_s"]
    parts = {"events_main_process": cpu.get("events,cpu:main", float("nan"))}
    for name in ("fetch", "persist", "model"):
        parts[f"{name}_task"] = stages.get(name, {}).get("cpu_s", 0.0)
    parts["relay_after_stages"] = sum(s["relay_cpu_s"] for s in stages.values())
    parts["model_thread"] = r["model_thread"]["cpu_ms_per_item"] * done / 1000
    parts["events_children_other"] = (cpu.get("events,cpu", float("nan")) - parts["events_main_process"]
                                      - parts["fetch_task"] - parts["persist_task"]
                                      - sum(s["relay_cpu_s"] for n, s in stages.items() if n != "model"))
    parts["gpu_worker_other"] = (cpu.get("gpu", float("nan")) - parts["model_thread"] - parts["model_task"]
                                 - stages.get("model", {}).get("relay_cpu_s", 0.0))
    if "beat" in cpu:
        parts["beat"] = cpu["beat"]
    return {k: round(v * 1000 / done, 1) for k, v in parts.items()}


def summarise_round(r: dict[str, object], args: argparse.Namespace, failed: int) -> dict[str, object]:
    """One round's figures: throughput and latency, the ratios to its own bare runs, and the
    orchestration's cost per product."""
    runs = r["bare"]
    same = {p: runs[p] for p in ("PASSIVE", "ACTIVE")}  # the worker's thread budget
    bare_policy = max(same, key=lambda p: same[p]["items_per_s"])
    bare = same[bare_policy]["items_per_s"]
    all_cores = runs["ACTIVE all cores"]
    model_cpu_ms = runs["PASSIVE"]["cpu_s_per_item"] * 1000  # like for like with the workers' CPU
    done = max(1, r["seen"])
    eps = r["seen"] / r["elapsed"]
    lat = r["latencies"]
    q = statistics.quantiles(lat, n=20) if len(lat) > 1 else [lat[0]] * 19
    worker_cpu_ms = {role: round(v * 1000 / done, 1) for role, v in r["cpu_s"].items() if ":" not in role}
    total_cpu_ms = sum(worker_cpu_ms.values())
    task_total = sum(r["tasks"].values())
    return {"events": r["published"], "completed": r["seen"], "failed": failed, "seconds": round(r["elapsed"], 2),
            "events_per_s": round(eps, 3), "latency_p50_s": round(statistics.median(lat), 2),
            "latency_p95_s": round(q[18], 2), "bare_model_items_per_s": round(bare, 3),
            "ratio_to_bare_model": round(eps / bare, 3),
            "bare_model_torch_threads": same[bare_policy]["torch_threads"],
            "bare_model_all_cores_items_per_s": round(all_cores["items_per_s"], 3),
            "bare_model_all_cores_torch_threads": all_cores["torch_threads"],
            "ratio_to_bare_model_all_cores": round(eps / all_cores["items_per_s"], 3),
            "batch_size": args.batch_size, "profile": args.profile, "device": args.device,
            "cpu_threads": args.cpu_threads,
            "grammar_threads": mask_fill_threads(args.grammar_threads),
            "grammar_overlap": args.grammar_overlap == "on",
            "bare_items_per_s_by_omp_wait_policy": {p: round(v["items_per_s"], 3) for p, v in runs.items()},
            "random_weights": args.profile != "pretrained",
            "cpu_ms_per_product_all_workers": round(total_cpu_ms, 1),
            "cpu_ms_per_product_by_role": worker_cpu_ms,
            "model_cpu_ms_per_product_bare": round(model_cpu_ms, 1),
            "orchestration_cpu_ms_per_product": round(total_cpu_ms - model_cpu_ms, 1),
            "cpu_ms_per_product_by_part": cpu_by_part(r, done),
            "cpu_ms_per_product_beside_workers": {k: round(v * 1000 / done, 1) for k, v in r["infra_cpu_s"].items()
                                                  if k != "box"},
            "box_cpu_ms_per_product": round(r["infra_cpu_s"]["box"] * 1000 / done, 1),
            "box_busy_share": round(r["box_busy_share"], 3),
            "db_transactions_per_product": round(r["transactions"] / done, 2),
            "task_messages_per_product": round(task_total / done, 2),
            "broker_messages_per_product": round(task_total / done + 2, 2),
            "task_messages_by_name": {k: v for k, v in sorted(r["tasks"].items()) if v},
            "model_thread": r["model_thread"],
            "bare_model_thread": {"wall_ms_per_item": round(1000 / bare, 1),
                                  "cpu_ms_per_item": round(same[bare_policy]["thread_cpu_s_per_item"] * 1000, 1)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--cpu-threads", type=int, default=1, help="torch/OpenCV threads, workers and bare run alike")
    ap.add_argument("--grammar-threads", type=int, default=0,
                    help="threads filling a batch's grammar masks, workers and bare run alike (0: every core)")
    ap.add_argument("--grammar-overlap", choices=("on", "off"), default="on",
                    help="grammar masks filled during the forward pass, workers and bare run alike")
    ap.add_argument("--worker-env", action="append", default=[], metavar="NAME=VALUE",
                    help="extra environment for the worker processes (e.g. a profiler on PYTHONPATH)")
    ap.add_argument("--gpu-concurrency", type=int, default=None,
                    help="threads of the gpu worker (default: the worker's own, two batches' worth)")
    ap.add_argument("--events-concurrency", type=int, default=None,
                    help="prefork processes of the events/CPU worker (default: the worker's own)")
    ap.add_argument("--beat", choices=("on", "off"), default="on",
                    help="run `enrich beat` beside the workers, as a deployment does (its CPU is counted)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="timed windows, each for a fresh tenant and followed by its own bare runs; the median round is printed")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--bare-only", action="store_true", help=argparse.SUPPRESS)  # one bare run, JSON out
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if args.grammar_threads < 0:
        ap.error("--grammar-threads must be 0 (every core) or more")
    if args.bare_only:
        import torch  # loaded first, so that the limit below reaches it (as the worker's model build does)

        from workers.wiring import limit_cpu_threads

        limit_cpu_threads(args.cpu_threads)  # the bare run gets the same thread budget as a worker
        rate, cpu_s, thread_cpu_s = bare_model_throughput(
            photos(args.n), args.batch_size, args.profile, args.device, args.max_new_tokens,
            args.grammar_threads, args.grammar_overlap == "on")
        print(json.dumps({"items_per_s": rate, "cpu_s_per_item": cpu_s, "thread_cpu_s_per_item": thread_cpu_s,
                          "torch_threads": torch.get_num_threads()}))
        return
    require_service(5672, "RabbitMQ", "start rabbitmq-server")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from sqlalchemy import text

    from db import migrate
    from db.embedded import start_embedded
    from db.engine import make_engine
    from tasks.events import product_event_payload

    tmp = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    pg_url = start_embedded(tmp / "pgdata")
    engine = make_engine(pg_url)
    migrate.upgrade(engine)
    ns = f"b{uuid.uuid4().hex[:8]}"
    env = base_env(pg_url=pg_url, data_dir=tmp, namespace=ns, ENRICH_MODELS__PROFILE=args.profile,
                   ENRICH_MODELS__DEVICE=args.device, ENRICH_WORKERS__BATCH_SIZE=str(args.batch_size),
                   ENRICH_MODELS__MAX_NEW_TOKENS=str(args.max_new_tokens),
                   ENRICH_MODELS__GRAMMAR_THREADS=str(args.grammar_threads),
                   ENRICH_MODELS__GRAMMAR_OVERLAP=str(args.grammar_overlap == "on").lower(),
                   ENRICH_WORKERS__CPU_THREADS=str(args.cpu_threads),
                   **dict(kv.split("=", 1) for kv in args.worker_env))
    if not any(kv.startswith("OMP_WAIT_POLICY=") for kv in args.worker_env):
        env.pop("OMP_WAIT_POLICY", None)  # the workers' own default, not the bare run's
    dep = Deployment(env=env, data_dir=tmp, namespace=ns, engine=engine)
    items = photos(args.n)
    if len(items) < args.n:
        print(f"only {len(items)} validation photos in the dataset: {len(items)} events per round", file=sys.stderr)
    try:
        roles = {"events,cpu": dep.start_worker("events,cpu", concurrency=args.events_concurrency),
                 "gpu": dep.start_worker("gpu", concurrency=args.gpu_concurrency)}
        if args.beat == "on":  # its schedule's tasks run in the events/CPU worker, counted there
            roles["beat"] = dep.start_beat()
        meter, infra = CpuMeter(roles), InfraMeter(tmp / "pgdata")
        # Model load and every timed category's grammar compile out of the timing (one product per
        # category, under a tenant of its own; the bare run warms up the same way).
        warm = [product_event_payload(tenant_id="bench-warm-up", merchant_id="m", external_id=f"w-{cat}", version=1,
                                      category=cat, image_urls=[path.as_uri()])
                for cat, path in {cat: path for path, cat in items}.items()]
        dep.wait_finished([dep.publish(w) for w in warm], timeout=600)
        dep.drain_listing_events()
        time.sleep(2)  # let the warm-up's relay and acks settle before the counters start
        rounds = []
        for k in range(args.rounds):
            timed = timed_round(dep, meter, infra, engine, tmp, ns, items, tenant=f"bench-r{k}")
            # Right after each timed window, on an idle machine (the workers wait for messages):
            # the box's speed drifts by a third over minutes, so each round has its own reference.
            timed["bare"] = {"PASSIVE": bare_run(args, "PASSIVE", args.cpu_threads),
                             "ACTIVE": bare_run(args, "ACTIVE", args.cpu_threads),
                             "ACTIVE all cores": bare_run(args, "ACTIVE", 0)}
            rounds.append(timed)
        with engine.connect() as c:
            failed = c.execute(text("SELECT count(*) FROM enrichment_jobs WHERE status='failed'")).scalar()
    finally:
        dep.stop_workers()
        dep.delete_broker_objects()
    summaries = [summarise_round(r, args, failed) for r in rounds]
    ordered = sorted(summaries, key=lambda r: r["ratio_to_bare_model"])
    result = dict(ordered[len(ordered) // 2])  # the median round (the lower middle one of an even count)
    result["rounds"] = len(summaries)
    result["ratio_to_bare_model_by_round"] = [r["ratio_to_bare_model"] for r in summaries]
    result["ratio_to_bare_model_all_cores_by_round"] = [r["ratio_to_bare_model_all_cores"] for r in summaries]
    result["events_per_s_by_round"] = [r["events_per_s"] for r in summaries]
    result["bare_model_items_per_s_by_round"] = [r["bare_model_items_per_s"] for r in summaries]
    result["model_thread_busy_share_by_round"] = [r["model_thread"]["busy_share"] for r in summaries]
    result["box_busy_share_by_round"] = [r["box_busy_share"] for r in summaries]
    print(f"{'metric':28} value")
    for k, v in result.items():
        print(f"{k:28} {v}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
