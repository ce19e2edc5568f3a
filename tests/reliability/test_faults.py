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
    return sum(1 for ids in re.findall(r"point=model\.batch.*?job_ids=\[([0-9, ]*)\]", dep.log_text())
               if job_id in {int(x) for x in ids.replace(" ", "").split(",") if x})


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
