"""Celery adapters of the retrain loop: the periodic pair builder (beat) runs on the cpu queue."""

from __future__ import annotations

from typing import Any

from celery import Task

from db.engine import session_scope
from tasks import metrics
from tasks.adapter import catalog_task
from tasks.feedback.pairs import RetrainConfig, build_preference_pairs
from tasks.runtime import get_runtime


@catalog_task("retrain.build_pairs", queue="cpu", ignore_result=True)
def build_pairs(self: Task) -> dict[str, Any]:
    """One incremental run; a run that finds another one holding the lock returns 'skipped'."""
    runtime = get_runtime()
    if runtime.datasets is None:
        raise RuntimeError("no dataset store in this worker's runtime (Settings.datasets_uri)")
    with session_scope(runtime.session_factory) as session:
        result = build_preference_pairs(session, runtime.datasets, runtime.retrain or RetrainConfig())
    metrics.pairs_built(result.status.value, result.pairs)
    return {"status": result.status.value, "dataset": result.name, "pairs": result.pairs,
            "watermark": result.watermark}
