"""Celery adapter of the retention run: ``catalog.prune`` on beat (cpu queue).

Beat passes the policy as keyword arguments (the ``ENRICH_RETENTION__*`` settings of the beat
process, ``workers.celery_app``), so the task needs nothing from its worker but the database and
the blob store the result documents live in.
"""

from __future__ import annotations

from typing import Any

from celery import Task

from tasks.adapter import catalog_task
from tasks.maintenance.retention import RetentionPolicy, run_retention
from tasks.runtime import get_runtime


@catalog_task("prune", queue="cpu", ignore_result=True)
def prune(self: Task, **policy: Any) -> dict[str, Any]:
    """One bounded pruning run (see ``tasks.maintenance.retention``); returns what it removed."""
    runtime = get_runtime()
    chosen = RetentionPolicy.from_seconds(**policy) if policy else RetentionPolicy()
    return run_retention(runtime.session_factory, runtime.blobs, chosen).as_dict()
