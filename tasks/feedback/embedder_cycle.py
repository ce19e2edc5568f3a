"""One periodic embedder cycle (``catalog.retrain.finetune_embedder``): new rows → candidate → gate.

Builds the next embedder dataset from the reviews since the last run (advisory-locked, incremental);
when it holds at least ``min_rows`` training rows, fine-tunes the active clip version on it, registers
the candidate and runs the gate, which records its decision on the row. Rolling an approved candidate
out (backfill of the whole catalog, compare, activate) stays a maintenance step
(``enrich retrain promote --model-version ID``), as in the listing-model loop. Imports the ML stack:
it runs on the GPU worker.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from db.engine import session_scope, system_session
from db.repositories import model_versions
from models.embedder_training import ContrastiveConfig
from models.embeddings import ClipEmbedder
from tasks.feedback.embedder_data import EmbedderDataConfig, build_embedder_dataset
from tasks.feedback.embedder_finetune import finetune_candidate
from tasks.feedback.promotion import promote
from tasks.io.blobs import BlobStore
from tasks.pipeline.serving import config_for, version_ref


def active_clip(runtime: Any) -> ClipEmbedder:
    """The clip embedder of the registry's active version (this worker's configured one before the
    first deployment), built the way the GPU worker builds its bundle."""
    from models.config import ModelConfig

    base = runtime.model_config or ModelConfig()
    with system_session(runtime.session_factory) as session:
        active = model_versions.active(session).get("clip")
        config = config_for(base, {"clip": version_ref(active)}) if active is not None else base
    return runtime.models_factory(config).embedder


def run_cycle(runtime: Any, *, model_store: BlobStore, data: EmbedderDataConfig, training: ContrastiveConfig,
              min_rows: int, margin: float) -> dict[str, Any]:
    if runtime.datasets is None:
        raise RuntimeError("no dataset store in this worker's runtime (Settings.datasets_uri)")
    with session_scope(runtime.session_factory) as session:
        built = build_embedder_dataset(session, runtime.datasets, data)
    out: dict[str, Any] = {"status": built.status.value, "dataset": built.name, "rows": built.pairs}
    if not built.name or built.pairs < min_rows:
        return {**out, "trained": False}
    padding = (runtime.model_config.crop_padding if runtime.model_config else 0.05)
    result = finetune_candidate(runtime.session_factory, datasets=runtime.datasets, originals=runtime.blobs,
                                embedder=active_clip(runtime), dataset_name=built.name, model_store=model_store,
                                config=training, padding=padding)
    with session_scope(runtime.session_factory) as session:
        decision = promote(session, result.model_version_id, margin=margin)
    return {**out, "trained": True, "model_version_id": result.model_version_id, "weights_uri": result.weights_uri,
            "gate": {k: v for k, v in asdict(decision).items() if k in ("promoted", "reasons", "candidate", "active")}}
