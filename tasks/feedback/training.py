"""Training hook: one DPO run on a recorded dataset → a *candidate* listing-model version.

``train_candidate`` reads the dataset's JSONL (local or S3), resolves each pair's image from the
originals store (cropped to its grounding box, as the model saw it), runs ``models.dpo`` on the
train split, saves the merged weights as a loadable directory, evaluates base and candidate on the
held-out split (schema-valid rate of constrained generation, field-level accuracy against the
merchant's corrections, DPO reward accuracy) and upserts a ``model_versions`` row with status
``candidate``. ``tasks.feedback.promotion.promote`` is the separate, gated step that makes a
candidate active.

Weights are stored content-addressed in the model store (a directory or ``s3://`` prefix):
``vlm/<revision>/…`` where the revision is the content hash of the weight files, with the
provenance file (``enrich-weights.json``) written last as the completeness marker. Training the
same data again never overwrites weights behind an existing row: identical weights land on the
same key (already there: nothing is written), different weights on a new one.
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
from jsonschema import ValidationError
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from db.enums import ModelKind
from db.repositories import datasets as dataset_rows
from db.repositories import model_versions
from models.boxes import product_crop
from models.categories import load_schema, validate_listing
from models.config import ModelConfig
from models.dpo import DpoConfig, PreferenceExample, PreferenceTuner
from models.errors import ModelError
from models.images import decode_image
from models.listing import ListingGenerator, ListingRequest
from models.identity import PROVENANCE_FILE, model_identity
from models.vlm_builders import save_vlm
from tasks.feedback.datasets import read_split
from tasks.io.blobs import BlobStore

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class CandidateResult:
    model_version_id: int
    weights_uri: str  # where the registry says the weights are (what GPU workers load)
    weights_dir: Path | None  # the same weights as a local directory, when the model store is local
    metrics: dict[str, Any]


def store_weights(directory: Path, store: BlobStore, kind: str = "vlm") -> tuple[str, str]:
    """(weights URI, revision): ``directory`` copied into ``store`` at ``<kind>/<revision>``, the
    provenance file last. Weights already stored under that revision are left as they are."""
    revision = model_identity(kind, str(directory), profile="pretrained").revision
    key = f"{kind}/{revision}"
    if not store.exists(f"{key}/{PROVENANCE_FILE}"):
        files = sorted((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.name == PROVENANCE_FILE)
        for path in files:
            store.put(f"{key}/{path.relative_to(directory).as_posix()}", path.read_bytes())
    return store.uri_for(key), revision


def _image(originals: BlobStore, row: dict[str, Any], cache: dict[str, Image.Image], padding: float) -> Image.Image:
    """The crop the listing model read when it wrote the rejected listing (``models.boxes.product_crop``:
    the padded box, or the whole photo where the grounding fell back and the row has no box)."""
    uri = row["images"][0]
    if uri not in cache:
        cache[uri] = decode_image(originals.get(uri)).image
    return product_crop(cache[uri], row.get("image_box"), padding)


def _examples(rows: list[dict[str, Any]], images: list[Image.Image]) -> list[PreferenceExample]:
    return [PreferenceExample(r["prompt"], r["chosen"], r["rejected"], im) for r, im in zip(rows, images, strict=True)]


def _fields(listing: dict[str, Any], part: str = "listing") -> dict[str, Any]:
    """Field -> value of a listing, or of one phase's part of it (a pair's ``part``)."""
    if part == "attributes":
        return {f"attributes.{k}": v for k, v in listing.items()}
    out = {k: listing.get(k) for k in ("title", "description")}
    if part == "text":
        return out
    out.update({f"attributes.{k}": v for k, v in (listing.get("attributes") or {}).items()})
    return out


def evaluate(generator: ListingGenerator, rows: list[dict[str, Any]], images: list[Image.Image], *,
             max_new_tokens: int | None = None) -> dict[str, Any]:
    """Constrained generation on held-out pairs: schema-valid rate and field accuracy vs the chosen listing."""
    if not rows:
        return {"pairs": 0, "schema_valid_rate": None, "field_accuracy": None, "corrected_field_accuracy": None}
    valid = fields = hits = corrected = corrected_hits = 0
    for row, image in zip(rows, images, strict=True):
        schema = load_schema(*_schema_ref(row["schema_id"]))
        data = row.get("merchant_data") or {}
        request = ListingRequest(image=image, schema=schema, merchant_title=data.get("title", ""),
                                 merchant_description=data.get("description", ""),
                                 merchant_attributes=data.get("attributes") or {}, locale=row.get("locale") or "en")
        try:
            output = generator.predict([request], max_new_tokens=max_new_tokens)[0].output
            validate_listing(schema, output)
            valid += 1
        except (ModelError, ValidationError):
            output = {}
        part = row.get("part", "listing")
        chosen, rejected = _fields(json.loads(row["chosen"]), part), _fields(json.loads(row["rejected"]), part)
        got = _fields(output)
        for name, value in chosen.items():
            fields += 1
            hits += got.get(name) == value
            if rejected.get(name) != value:
                corrected += 1
                corrected_hits += got.get(name) == value
    return {"pairs": len(rows), "schema_valid_rate": valid / len(rows), "field_accuracy": hits / max(fields, 1),
            "corrected_field_accuracy": corrected_hits / corrected if corrected else None}


def _schema_ref(schema_id: str) -> tuple[str, int | None]:
    name, _, version = schema_id.partition("@")
    return name, int(version) if version.isdigit() else None


def train_candidate(factory: sessionmaker[Session], *, datasets: BlobStore, originals: BlobStore,
                    generator: ListingGenerator, dataset_name: str, model_store: BlobStore,
                    config: DpoConfig = DpoConfig(), eval_max_new_tokens: int = 128,
                    crop_padding: float = ModelConfig.crop_padding) -> CandidateResult:
    """Train on ``dataset_name`` from ``generator`` (the base: the active listing model), store the
    weights content-addressed in ``model_store``, evaluate base and candidate on the held-out split
    and register the candidate with its metrics."""
    with factory() as session:
        dataset = dataset_rows.dataset_named(session, dataset_name)
        if dataset is None:
            raise LookupError(f"no training dataset named {dataset_name!r}")
        dataset_id, uri, content_hash = dataset.id, dataset.uri, dataset.content_hash
    train_rows, held_rows = read_split(datasets, uri, "train"), read_split(datasets, uri, "holdout")
    if not train_rows:
        raise ValueError(f"dataset {dataset_name} has no training pairs")
    cache: dict[str, Image.Image] = {}
    train_images = [_image(originals, r, cache, crop_padding) for r in train_rows]
    held_images = [_image(originals, r, cache, crop_padding) for r in held_rows]
    generator.load()
    base = generator.version()
    started = datetime.now(UTC)
    tuner = PreferenceTuner(generator.model, generator.processor, config)
    report = tuner.train(_examples(train_rows, train_images), _examples(held_rows, held_images))
    staging = Path(tempfile.mkdtemp(prefix="candidate-vlm-"))
    try:
        save_vlm(tuner.trained_model(), generator.processor, staging, random_weights=base.random_weights,
                 base=base.canonical, produced_by="tasks.feedback.training.train_candidate",
                 extra={"dataset": dataset_name})
        weights_uri, revision = store_weights(staging, model_store)
        random_weights = model_identity("vlm", str(staging), profile="pretrained").random_weights
        local = _local_dir(weights_uri)
        candidate = ListingGenerator(profile="pretrained", vlm=str(local or staging), device=str(generator.device))
        before = evaluate(generator, held_rows, held_images, max_new_tokens=eval_max_new_tokens)
        after = evaluate(candidate, held_rows, held_images, max_new_tokens=eval_max_new_tokens)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    metrics = {"holdout": after, "base_holdout": before,
               "dpo": {"steps": report.steps, "train_pairs": len(train_rows), "first_loss": report.train_losses[0],
                       "last_loss": report.train_losses[-1], "holdout_loss": report.holdout_loss,
                       "holdout_reward_accuracy": report.holdout_reward_accuracy,
                       "holdout_reward_margin": report.holdout_reward_margin,
                       "trainable_parameters": report.trainable_parameters},
               "random_weights": random_weights,
               "seconds": round((datetime.now(UTC) - started).total_seconds(), 2)}
    params = {"base": base.key, "dataset": dataset_name, "dataset_id": dataset_id, "dataset_hash": content_hash,
              "weights_uri": weights_uri, "dpo": asdict(config), "method": "dpo-lora" if config.lora_rank else "dpo"}
    with factory() as session, session.begin():
        version_id = model_versions.upsert_candidate(
            session, kind=ModelKind.vlm.value, name=weights_uri, revision=revision, profile="pretrained",
            random_weights=random_weights, params=params, metrics=metrics, weights_uri=weights_uri)
    log.info("retrain.candidate", model_version_id=version_id, dataset=dataset_name, steps=report.steps,
             schema_valid_rate=after["schema_valid_rate"], field_accuracy=after["field_accuracy"])
    return CandidateResult(version_id, weights_uri, local, metrics)


def _local_dir(uri: str) -> Path | None:
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(uri)
    return Path(unquote(parts.path)) if parts.scheme == "file" else None
