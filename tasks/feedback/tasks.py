"""Celery adapters of the retrain loops: the periodic pair builder (beat) runs on the cpu queue, the
periodic embedder fine-tune (beat) on the gpu queue."""

from __future__ import annotations

from datetime import timedelta
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


@catalog_task("retrain.finetune_embedder", queue="gpu", ignore_result=True)
def finetune_embedder(self: Task, model_store_uri: str, min_rows: int = 64, holdout_fraction: float = 0.1,
                      window_days: int = 30, settle_s: float = 60.0, epochs: int = 5,
                      learning_rate: float = 1e-4, margin: float = 0.01) -> dict[str, Any]:
    """New accepted/edited listings → embedder dataset → (enough rows) candidate clip version → gate."""
    from models.embedder_training import ContrastiveConfig  # the ML stack: GPU worker only
    from tasks.feedback.embedder_cycle import run_cycle
    from tasks.feedback.embedder_data import EmbedderDataConfig
    from tasks.io.blobs import open_blob_store

    runtime = get_runtime()
    data = EmbedderDataConfig(window_days=window_days, holdout_fraction=holdout_fraction,
                              settle=timedelta(seconds=settle_s))
    return run_cycle(runtime, model_store=open_blob_store(model_store_uri), data=data,
                     training=ContrastiveConfig(epochs=epochs, lr=learning_rate), min_rows=min_rows, margin=margin)
