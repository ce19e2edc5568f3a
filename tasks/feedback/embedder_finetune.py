"""One contrastive fine-tune of the active clip embedder on a catalog dataset → a *candidate* clip version.

``finetune_candidate`` reads a dataset written by ``tasks.feedback.embedder_data`` (local or S3),
cuts each row's crop from the stored original exactly as the pipeline did (the grounding box with
the grounder's padding, ``models.boxes.padded_crop_box``; the whole photo where the pipeline fell
back), builds each row's text with the pipeline's ``visual_description``, trains a copy of the base
(``models.embedder_training.fine_tune_clip``: symmetric InfoNCE, same (category, attributes) items
masked as false negatives, category-run batches as hard negatives), evaluates base and candidate on
the held-out rows (``models.retrieval_eval``), stores the weights content-addressed
(``clip/<revision>/`` in the model store, provenance last) and registers the candidate under the
identity a backfill of those weights computes, so ``enrich backfill --model <weights_uri>`` and the
gate work on the same row.

Imports the ML stack: only the GPU worker's task body and the CLI load this module.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from db.enums import ModelKind
from db.repositories import datasets as dataset_rows
from db.repositories import model_versions
from models.boxes import product_crop
from models.embedder_training import ContrastiveConfig, evaluate_clip, fine_tune_clip
from models.embeddings import ClipEmbedder, save_clip, visual_description
from models.images import decode_image
from models.prompts import category_noun
from models.retrieval_eval import headline
from tasks.feedback.datasets import read_manifest, read_split
from tasks.feedback.embedder_data import FORMAT
from tasks.feedback.training import CandidateResult, store_weights
from tasks.io.blobs import BlobStore

log = structlog.get_logger(__name__)

GATE_METRIC = "mrr"  # held-out image→image same-category MRR (models.retrieval_eval)


@dataclass(frozen=True)
class EmbedderRows:
    rows: list[dict[str, Any]]
    crops: list[Image.Image]

    @property
    def categories(self) -> list[str]:
        return [r["category"] for r in self.rows]

    @property
    def attributes(self) -> list[dict[str, Any]]:
        return [r.get("attributes") or {} for r in self.rows]

    @property
    def texts(self) -> list[str]:
        return [visual_description(r["category"], r.get("attributes") or {}) for r in self.rows]

    @property
    def negative_keys(self) -> list[str]:
        """Items that show the same thing (category and every visual attribute) are not negatives."""
        return [json.dumps([r["category"], sorted((r.get("attributes") or {}).items())]) for r in self.rows]


def pipeline_crop(image: Image.Image, box: list[float] | None, padding: float) -> Image.Image:
    return product_crop(image, box, padding)  # the GPU stage's own rule (models.boxes)


def load_rows(datasets: BlobStore, originals: BlobStore, uri: str, split: str, padding: float) -> EmbedderRows:
    rows = read_split(datasets, uri, split)
    cache: dict[str, Image.Image] = {}
    crops = []
    for r in rows:
        if r["image_uri"] not in cache:
            cache[r["image_uri"]] = decode_image(originals.get(r["image_uri"])).image
        crops.append(pipeline_crop(cache[r["image_uri"]], r.get("image_box"), padding))
    return EmbedderRows(rows, crops)


def evaluate(embedder: ClipEmbedder, data: EmbedderRows) -> dict[str, Any]:
    """Held-out metrics: the flat headline figures (what the gate and ``list`` read) plus the detail."""
    detail = evaluate_clip(embedder, data.crops, data.categories, data.attributes, noun=category_noun)
    return {**headline(detail), "rows": len(data.rows), "detail": detail}


def finetune_candidate(factory: sessionmaker[Session], *, datasets: BlobStore, originals: BlobStore,
                       embedder: ClipEmbedder, dataset_name: str, model_store: BlobStore,
                       config: ContrastiveConfig = ContrastiveConfig(), padding: float = 0.05) -> CandidateResult:
    """Fine-tune ``embedder`` (the base: the active clip version) on ``dataset_name`` and register
    the result as a candidate clip version with base and candidate held-out metrics."""
    with factory() as session:
        dataset = dataset_rows.dataset_named(session, dataset_name)
        if dataset is None:
            raise LookupError(f"no training dataset named {dataset_name!r}")
        dataset_id, uri, content_hash = dataset.id, dataset.uri, dataset.content_hash
    if read_manifest(datasets, uri).get("format") != FORMAT:
        raise ValueError(f"dataset {dataset_name} is not an embedder dataset ({FORMAT}); build one with "
                         "`enrich retrain build-embedder-data`")
    train, held = (load_rows(datasets, originals, uri, s, padding) for s in ("train", "holdout"))
    if len(train.rows) < 2:
        raise ValueError(f"dataset {dataset_name} has {len(train.rows)} training rows; contrastive training needs 2")
    embedder.load()
    base = embedder.version()
    started = datetime.now(UTC)
    trained, report = fine_tune_clip(embedder, train.crops, train.texts, train.categories, train.negative_keys,
                                     config, progress=lambda p: log.info("embedder_finetune.progress", **p))
    staging = Path(tempfile.mkdtemp(prefix="candidate-clip-"))
    try:
        save_clip(trained, staging, random_weights=base.random_weights, base=base.canonical,
                  produced_by="tasks.feedback.embedder_finetune.finetune_candidate")
        weights_uri, _ = store_weights(staging, model_store, kind=ModelKind.clip.value)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    candidate = ClipEmbedder(weights_uri, profile="pretrained", device=embedder.device_spec,
                             cache_dir=embedder.cache_dir, s3_endpoint_url=embedder.s3_endpoint_url)
    identity = candidate.identity()
    before, after = evaluate(embedder, held), evaluate(candidate, held)
    metrics = {"holdout": after, "base_holdout": before, "gate_metric": GATE_METRIC,
               "training": {k: v for k, v in asdict(report).items() if k != "losses"} | {"epoch_losses": report.losses},
               "train_rows": len(train.rows), "random_weights": identity.random_weights,
               "seconds": round((datetime.now(UTC) - started).total_seconds(), 2)}
    params = {"base": base.key, "dataset": dataset_name, "dataset_id": dataset_id, "dataset_hash": content_hash,
              "weights_uri": weights_uri, "ref": weights_uri, "contrastive": asdict(config),
              "method": f"contrastive-{config.trainable}"}
    with factory() as session, session.begin():
        version_id = model_versions.upsert_candidate(
            session, kind=ModelKind.clip.value, name=identity.name, revision=identity.revision, profile="pretrained",
            random_weights=identity.random_weights, params=params, metrics=metrics, weights_uri=weights_uri,
            dims=trained.dims)
    log.info("embedder_finetune.candidate", model_version_id=version_id, dataset=dataset_name, steps=report.steps,
             mrr=after.get("mrr"), base_mrr=before.get("mrr"))
    return CandidateResult(version_id, weights_uri, None, metrics)
