"""Persist (CPU): grounding, listing and embeddings in one transaction with idempotent upserts,
the job marked done, and ``listing.enriched`` written to the outbox — all or nothing."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from db.engine import job_session
from db.enums import Stage
from db.tables import Embedding, EnrichmentJob, Grounding, Listing, ModelVersion, Product
from tasks import faults
from tasks.pipeline import jobs
from tasks.events import SCHEMA_VERSION, now_iso
from tasks.pipeline.outbox import enqueue
from tasks.runtime import Runtime

log = structlog.get_logger(__name__)


def _upsert_grounding(session: Session, tenant_id: str, image_id: int, detector_id: int, g: dict[str, Any]) -> int:
    stmt = insert(Grounding).values(tenant_id=tenant_id, image_id=image_id, model_version_id=detector_id,
                                    prompt=g["prompt"], box=g["box"], score=g["score"], fallback=g["fallback"])
    return session.execute(stmt.on_conflict_do_update(
        index_elements=["tenant_id", "image_id", "model_version_id", "prompt"],
        set_={"box": stmt.excluded.box, "score": stmt.excluded.score, "fallback": stmt.excluded.fallback},
    ).returning(Grounding.id)).scalar_one()


def _insert_listing(session: Session, values: dict[str, Any]) -> int:
    new_id = session.execute(insert(Listing).values(**values).on_conflict_do_nothing(
        index_elements=["tenant_id", "product_id", "product_version", "model_version_id"]).returning(Listing.id)
    ).scalar_one_or_none()
    if new_id is not None:
        return new_id
    return session.scalar(select(Listing.id).where(
        Listing.tenant_id == values["tenant_id"], Listing.product_id == values["product_id"],
        Listing.product_version == values["product_version"],
        Listing.model_version_id == values["model_version_id"]))  # type: ignore[return-value]


def _insert_embedding(session: Session, values: dict[str, Any]) -> None:
    session.execute(insert(Embedding).values(**values).on_conflict_do_nothing(
        index_elements=["listing_id", "model_version_id"]))


def _from_result(session: Session, runtime: Runtime, job: EnrichmentJob, product: Product,
                 model_ids: dict[str, int], random_weights: bool) -> tuple[int, dict[str, Any]]:
    doc = json.loads(runtime.blobs.get(job.work["result_uri"]))
    image_id = job.work["primary_image_id"]
    grounding_id = _upsert_grounding(session, job.tenant_id, image_id, model_ids["detector"], doc["grounding"])
    listing_id = _insert_listing(session, dict(
        tenant_id=job.tenant_id, product_id=product.id, product_version=job.product_version,
        model_version_id=model_ids["vlm"], image_id=image_id, grounding_id=grounding_id, category=product.category,
        schema_id=doc["schema_id"], content=doc["content"], dropped_attributes=doc["dropped"],
        model_output=doc["model_output"], model_input=doc["model_input"], model_versions=model_ids,
        random_weights=random_weights))
    vec = doc["image_embedding"]
    _insert_embedding(session, dict(
        tenant_id=job.tenant_id, product_id=product.id, listing_id=listing_id, model_version_id=model_ids["clip"],
        category=product.category, dims=len(vec), image_embedding=vec, text_embedding=doc["text_embedding"],
        text_input=doc["text_input"]))
    return listing_id, doc["grounding"]


def _from_reuse(session: Session, job: EnrichmentJob, product: Product, source_id: int) -> tuple[int, dict[str, Any]]:
    """An identical image already enriched by the same models: copy, no model work."""
    src = session.get(Listing, source_id)
    assert src is not None
    listing_id = _insert_listing(session, dict(
        tenant_id=job.tenant_id, product_id=product.id, product_version=job.product_version,
        model_version_id=src.model_version_id, image_id=src.image_id, grounding_id=src.grounding_id,
        category=product.category, schema_id=src.schema_id, content=src.content,
        dropped_attributes=src.dropped_attributes, model_output=src.model_output, model_input=src.model_input,
        model_versions={**src.model_versions, "reused_from_listing_id": src.id}, random_weights=src.random_weights))
    for emb in session.scalars(select(Embedding).where(Embedding.listing_id == src.id)):
        _insert_embedding(session, dict(
            tenant_id=job.tenant_id, product_id=product.id, listing_id=listing_id,
            model_version_id=emb.model_version_id, category=product.category, dims=emb.dims,
            image_embedding=emb.image_embedding, text_embedding=emb.text_embedding, text_input=emb.text_input))
    g = session.get(Grounding, src.grounding_id) if src.grounding_id else None
    grounding = ({"box": g.box, "score": g.score, "fallback": g.fallback, "prompt": g.prompt} if g
                 else {"box": None, "score": None, "fallback": True, "prompt": ""})
    return listing_id, grounding


def _model_names(session: Session, model_ids: dict[str, int]) -> dict[str, str]:
    rows = session.scalars(select(ModelVersion).where(ModelVersion.id.in_(list(model_ids.values())))).all()
    by_id = {r.id: f"{r.name}@{r.revision}" for r in rows}
    return {kind: by_id.get(mid, str(mid)) for kind, mid in model_ids.items()}


def enriched_event(job: EnrichmentJob, product: Product, listing: Listing, grounding: dict[str, Any],
                   names: dict[str, str]) -> dict[str, Any]:
    content = listing.content
    return {
        "schema_version": SCHEMA_VERSION, "event_id": str(uuid.uuid4()), "event_type": "listing.enriched",
        "causation_id": str(job.event_id), "occurred_at": now_iso(), "tenant_id": job.tenant_id,
        "merchant_id": product.merchant_id,
        "product": {"external_id": product.external_id, "version": job.product_version},
        "listing": {"listing_id": listing.id, "category": listing.category, "schema_id": listing.schema_id,
                    "title": content["title"], "description": content["description"],
                    "attributes": content["attributes"], "status": listing.status,
                    "reused_from_listing_id": listing.model_versions.get("reused_from_listing_id")},
        "grounding": grounding,
        "duplicates": [{k: d.get(k) for k in ("image_url", "kind", "duplicate_of_product", "hamming_distance", "inliers")}
                       for d in job.work.get("duplicates", [])],
        "models": {"detector": names["detector"], "vlm": names["vlm"], "clip": names["clip"],
                   "random_weights": listing.random_weights},
    }


def persist(runtime: Runtime, job_id: int, task_id: str, model_ids: dict[str, int], random_weights: bool) -> int | None:
    """Returns the listing id, or None when the job had already ended (a duplicate delivery)."""
    started = time.perf_counter()
    with job_session(runtime.session_factory, job_id) as session:
        job = jobs.claim(session, job_id, Stage.persist, task_id, runtime.retry.max_stage_attempts)
        if job is None:
            return None
        product = session.get(Product, job.product_id)
        assert product is not None
        reuse = job.work.get("reuse_listing_id")
        if reuse:
            listing_id, grounding = _from_reuse(session, job, product, reuse)
        else:
            listing_id, grounding = _from_result(session, runtime, job, product, model_ids, random_weights)
        listing = session.get(Listing, listing_id)
        assert listing is not None
        names = _model_names(session, {k: listing.model_versions[k] for k in ("detector", "vlm", "clip")})
        enqueue(session, "listing.enriched", enriched_event(job, product, listing, grounding, names),
                tenant_id=job.tenant_id)
        jobs.finish(session, job, listing_id=listing_id, timings={"persist": (time.perf_counter() - started) * 1000})
        faults.hit("persist.before_commit", job_id=job_id)
    log.info("persist.done", job_id=job_id, listing_id=listing_id, reused=bool(reuse))
    return listing_id
