"""A GPU worker keeps its model thread fed: while one batch runs, the next batch's products are
already claimed, decoded and queued in the micro-batcher (``workers.worker_main.worker_pool``: two
batches' worth of task threads). Real RabbitMQ, worker subprocesses and the embedded Postgres; the
running batch is held by the ``sleep_in_model_s`` fault so that the check does not race it."""

from __future__ import annotations

import re
import time
from datetime import datetime

import pytest

from tests.reliability.harness import WorkerSpec

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HOLD_S = 6.0


def test_the_next_batch_is_claimed_and_queued_while_one_runs(make_deployment, new_tenant,  # noqa: ANN001
                                                             product_event) -> None:
    dep = make_deployment(ENRICH_WORKERS__BATCH_SIZE="2", ENRICH_WORKERS__BATCH_MAX_WAIT_MS="100")
    t = new_tenant()
    dep.start(WorkerSpec("events-cpu", "events,cpu", {}),
              WorkerSpec("gpu", "gpu", {"ENRICH_FAULTS__SLEEP_IN_MODEL_S": str(HOLD_S)}))
    ids = dep.publish_many([product_event(t, f"q{i}", i) for i in range(4)])
    dep.wait_log(r"fault\.sleep", name="gpu")  # the first batch is running (held by the fault)
    held = {int(x) for x in re.search(r"fault\.sleep.*?job_ids=\[([0-9, ]*)\]", dep.log_text("gpu")).group(1).split(",")}

    claimed: set[int] = set()
    deadline = time.monotonic() + HOLD_S - 1.0
    while time.monotonic() < deadline and len(claimed) < len(ids):
        claimed = {r.job_id for r in dep.job_rows(ids) if r.stage == "model" and (r.attempts or {}).get("model")}
        time.sleep(0.1)
    # Every product is claimed for the model stage while the first batch still runs: two batches'
    # worth of task threads (4), against one batch's worth (2) before.
    assert dep.count(r"batch\.done", "gpu") == 0, "the first batch ended before the check: raise HOLD_S"
    assert len(claimed) == len(ids), (sorted(claimed), sorted(held))
    assert held < claimed

    rows = dep.wait_finished(ids, timeout=180)
    assert {r.status for r in rows.values()} == {"done"}, [(r.status, r.error_code) for r in rows.values()]
    assert all(r.attempts["model"] == 1 for r in rows.values())  # queued, not retried
    # The next batch began as the first ended: no fill wait for products that were already queued.
    gap = _gap_between_first_batches(dep.log_text("gpu"))
    assert gap < 0.3, gap
    dep.check("gpu worker queues the next batch while one runs")


def _gap_between_first_batches(log: str) -> float:
    """Seconds from the end of the first held batch to the start of the second (the fault's sleep
    begins each batch; ``batch.done`` ends it)."""
    stamps = {"sleep": [], "done": []}
    for line in log.splitlines():
        kind = "sleep" if "fault.sleep" in line else "done" if "batch.done" in line else None
        if kind is not None:
            stamps[kind].append(_ts(line))
    return stamps["sleep"][1] - stamps["done"][0]


def _ts(line: str) -> float:
    return datetime.fromisoformat(line[:26]).timestamp()
