"""Celery adapters of the enrichment pipeline: fetch+dedup (cpu) → model (gpu) → persist (cpu).

Each task is a thin adapter: ids in, one pipeline function, then the outbox relay, which sends
the next stage's task that the function committed (and any event). Messages carry job ids only;
images and vectors travel through storage.
"""

from __future__ import annotations

from celery import Task

from tasks import faults
from tasks.adapter import catalog_task, relay_outbox, run_job_stage
from tasks.pipeline.fetch import fetch_and_dedup
from tasks.pipeline.model import model_stage
from tasks.pipeline.persist import persist
from tasks.runtime import get_runtime


@catalog_task("fetch", queue="cpu")
def fetch(self: Task, job_id: int) -> str | None:
    outcome = run_job_stage(self, job_id, lambda rt: fetch_and_dedup(rt, job_id, self.request.id, rt.model_ids))
    if outcome is None or outcome.next_stage is None:
        return None
    faults.hit("stage.committed", stage="fetch", job_id=job_id)
    relay_outbox(get_runtime())
    return outcome.next_stage.value


@catalog_task("model", queue="gpu")
def model(self: Task, job_id: int) -> bool:
    ran = run_job_stage(self, job_id, lambda rt: model_stage(rt, job_id, self.request.id))
    if ran:
        faults.hit("stage.committed", stage="model", job_id=job_id)
        relay_outbox(get_runtime())
    return bool(ran)


@catalog_task("persist", queue="cpu")
def persist_listing(self: Task, job_id: int) -> int | None:
    listing_id = run_job_stage(self, job_id, lambda rt: persist(rt, job_id, self.request.id, rt.model_ids,
                                                                rt.random_weights))
    if listing_id is not None:
        faults.hit("stage.committed", stage="persist", job_id=job_id)
    # Also when this delivery found the job already done: a crash between the persist commit and
    # the relay left that commit's listing.enriched in the outbox, and this redelivery publishes it.
    relay_outbox(get_runtime())
    return listing_id


@catalog_task("relay_outbox", queue="cpu", ignore_result=True)
def relay_outbox_task(self: Task) -> None:
    """Periodic safety net: publish outbox rows a crash left behind."""
    relay_outbox(get_runtime())
