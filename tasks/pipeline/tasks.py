"""Celery adapters of the pipeline: one thin task per stage of ``jobs.STAGES``, the outbox relay and
the coverage reconciler (both on beat).

Each stage task is a stage function behind ``stage_task`` (name and queue from the stage table;
failure policy, fault point, relay and timing in the decorator). Messages carry job ids only;
images and vectors travel through storage.
"""

from __future__ import annotations

from celery import Task

from db.engine import session_scope
from db.enums import Stage
from tasks.adapter import catalog_task, relay_outbox, stage_task
from tasks.pipeline.fetch import fetch_and_dedup
from tasks.pipeline.model import model_stage
from tasks.pipeline.persist import persist
from tasks.pipeline.reconcile import reconcile
from tasks.runtime import Runtime, get_runtime


@stage_task(Stage.fetch)
def fetch(runtime: Runtime, job_id: int, task_id: str) -> str | None:
    outcome = fetch_and_dedup(runtime, job_id, task_id)
    return outcome.next_stage.value if outcome.next_stage is not None else None


@stage_task(Stage.model)
def model(runtime: Runtime, job_id: int, task_id: str) -> bool:
    return model_stage(runtime, job_id, task_id)


@stage_task(Stage.persist)
def persist_listing(runtime: Runtime, job_id: int, task_id: str) -> int | None:
    return persist(runtime, job_id, task_id)


@catalog_task("relay_outbox", queue="cpu", ignore_result=True)
def relay_outbox_task(self: Task) -> None:
    """Periodic safety net: publish outbox rows a crash left behind."""
    relay_outbox(get_runtime())


@catalog_task("reconcile", queue="cpu", ignore_result=True)
def reconcile_task(self: Task, limit: int = 1000) -> int:
    """One reconciler pass: what it re-dispatches is committed to the outbox, then relayed."""
    from datetime import timedelta

    runtime = get_runtime()
    with session_scope(runtime.session_factory) as session:
        dispatches = reconcile(session, stalled_after=timedelta(seconds=runtime.stall_after_s),
                               queued_after=timedelta(seconds=runtime.queued_stall_after_s), limit=limit)
    if dispatches:
        relay_outbox(runtime)
    return len(dispatches)
