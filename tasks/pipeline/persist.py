"""Persist (CPU): grounding, listing and embeddings in one transaction with idempotent upserts,
the job marked done, and ``listing.enriched`` written to the outbox — all or nothing. A result whose
enrichment policy generated no listing (``tasks.pipeline.policy``) is recorded as the merchant's own
content with its vectors, and announced as ``product.indexed`` instead."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import structlog
from sqlalchemy.orm import Session

from db.engine import job_session
from db.enums import Stage
from db.repositories import listings, model_versions, products
from db.tables import EnrichmentJob, Listing, Product
from tasks import faults, tracing
from tasks.errors import ErrorCode, PipelineError
from tasks.events import contract_versions, now_iso
from tasks.pipeline import jobs
from tasks.pipeline.outbox import enqueue
from tasks.pipeline.policy import EnrichStage, generates_listing, policy_name
from tasks.pipeline.work import FetchedImages, ModelOutput
from tasks.runtime import Runtime

log = structlog.get_logger(__name__)

ENRICHED_VERSION = contract_versions("listing.enriched")[-1]


def _from_result(session: Session, doc: dict[str, Any], job: EnrichmentJob,
                 product: Product) -> tuple[int, bool, dict[str, Any]]:
    """The model stage's result document, recorded under the versions that produced it."""
    model_ids = doc.get("model_versions") or {}
    if set(model_ids) != {"detector", "vlm", "clip"}:
        raise PipelineError(ErrorCode.internal_error, "the model result names no model versions (written by a GPU "
                            "worker older than the registry); the reconciler runs the product again")
    random_weights = bool(doc.get("random_weights"))
    image_id = FetchedImages.of(job.work).primary_image_id
    g = doc["grounding"]
    grounding_id = listings.upsert_grounding(session, tenant_id=job.tenant_id, image_id=image_id,
                                             detector_id=model_ids["detector"], prompt=g["prompt"], box=g["box"],
                                             score=g["score"], fallback=g["fallback"])
    listing_id, created = listings.insert_listing(session, dict(
        tenant_id=job.tenant_id, product_id=product.id, product_version=job.product_version,
        model_version_id=model_ids["vlm"], image_id=image_id, grounding_id=grounding_id, category=product.category,
        schema_id=doc["schema_id"], content=doc["content"], dropped_attributes=doc["dropped"],
        model_output=doc["model_output"], model_versions=model_ids,
        model_input={**doc["model_input"], "reuse_key": FetchedImages.of(job.work).reuse_key},
        random_weights=random_weights, **truth_flags(doc)))
    vec = doc["image_embedding"]
    listings.insert_embedding(session, dict(
        tenant_id=job.tenant_id, product_id=product.id, listing_id=listing_id, model_version_id=model_ids["clip"],
        category=product.category, dims=len(vec), image_embedding=vec, text_embedding=doc["text_embedding"],
        text_input=doc["text_input"]))
    _photos(session, job, product, listing_id, grounding_id, model_ids, doc.get("images") or [])
    return listing_id, created, doc["grounding"]


def _photos(session: Session, job: EnrichmentJob, product: Product, listing_id: int, primary_grounding: int,
            model_ids: dict[str, int], photos: list[dict[str, Any]]) -> None:
    """Every photo's grounding and own vector (the primary's grounding is the listing's)."""
    rows = []
    for photo in photos:
        if photo.get("image_id") is None:
            continue
        g = photo["grounding"]
        grounding_id = primary_grounding if photo["position"] == 0 else listings.upsert_grounding(
            session, tenant_id=job.tenant_id, image_id=photo["image_id"], detector_id=model_ids["detector"],
            prompt=g["prompt"], box=g["box"], score=g["score"], fallback=g["fallback"])
        rows.append(dict(tenant_id=job.tenant_id, product_id=product.id, listing_id=listing_id,
                         image_id=photo["image_id"], model_version_id=model_ids["clip"], position=photo["position"],
                         on_product=photo["on_product"], product_probability=photo.get("product_probability"),
                         grounding_id=grounding_id, dims=len(photo["embedding"]), embedding=photo["embedding"]))
    listings.insert_photo_embeddings(session, rows)


def _from_embeddings(session: Session, doc: dict[str, Any], job: EnrichmentJob, product: Product) -> tuple[int, bool]:
    """A result of a policy without a listing (``tasks.pipeline.policy``): the product version's record
    under its clip version (the merchant's own content, no model output), its vectors, and the
    groundings where the policy grounded. The record is keyed by the clip version, so a later full
    enrichment of the same version adds its listing beside it."""
    model_ids = doc.get("model_versions") or {}
    if "clip" not in model_ids:
        raise PipelineError(ErrorCode.internal_error, "the model result names no clip version; the reconciler "
                            "runs the product again")
    stages = frozenset(doc["stages"])
    grounded = EnrichStage.grounding.value in stages
    image_id = FetchedImages.of(job.work).primary_image_id
    detector = model_ids.get("detector")

    def grounding_of(g: dict[str, Any] | None, of_image: int) -> int | None:
        if not grounded or not g or detector is None:
            return None
        return listings.upsert_grounding(session, tenant_id=job.tenant_id, image_id=of_image, detector_id=detector,
                                         prompt=g["prompt"], box=g["box"], score=g["score"], fallback=g["fallback"])

    primary_grounding = grounding_of(doc["grounding"], image_id)
    versions: dict[str, Any] = {"clip": model_ids["clip"], "policy": policy_name(stages)}
    if grounded and detector is not None:
        versions["detector"] = detector
    listing_id, created = listings.insert_listing(session, dict(
        tenant_id=job.tenant_id, product_id=product.id, product_version=job.product_version,
        model_version_id=model_ids["clip"], image_id=image_id, grounding_id=primary_grounding,
        category=product.category, schema_id=doc["schema_id"], content=doc["content"], dropped_attributes={},
        model_output={}, model_input={"policy": sorted(stages), "text_input": doc["text_input"]},
        model_versions=versions, random_weights=bool(doc.get("random_weights"))))
    vec = doc["image_embedding"]
    listings.insert_embedding(session, dict(
        tenant_id=job.tenant_id, product_id=product.id, listing_id=listing_id, model_version_id=model_ids["clip"],
        category=product.category, dims=len(vec), image_embedding=vec, text_embedding=doc["text_embedding"],
        text_input=doc["text_input"]))
    listings.insert_photo_embeddings(session, [dict(
        tenant_id=job.tenant_id, product_id=product.id, listing_id=listing_id, image_id=p["image_id"],
        model_version_id=model_ids["clip"], position=p["position"], on_product=True, product_probability=None,
        grounding_id=primary_grounding if p["position"] == 0 else grounding_of(p.get("grounding"), p["image_id"]),
        dims=len(p["embedding"]), embedding=p["embedding"]) for p in doc.get("images") or [] if p.get("image_id")])
    return listing_id, created


def indexed_event(job: EnrichmentJob, product: Product, listing_id: int, doc: dict[str, Any],
                  names: dict[str, str]) -> dict[str, Any]:
    """``product.indexed`` v1: what a policy without a listing publishes instead of ``listing.enriched``."""
    stages = frozenset(doc["stages"])
    return {
        "schema_version": 1, "event_id": str(uuid.uuid4()), "event_type": "product.indexed",
        "causation_id": str(job.event_id), "occurred_at": now_iso(), "tenant_id": job.tenant_id,
        "merchant_id": product.merchant_id,
        "product": {"external_id": product.external_id, "version": job.product_version}, "listing_id": listing_id,
        "policy": {"name": policy_name(stages), "stages": [s.value for s in EnrichStage if s.value in stages]},
        "grounding": doc["grounding"] or None,
        "duplicates": [d.as_event() for d in FetchedImages.of(job.work).duplicates],
        "photos": max(1, len([p for p in doc.get("images") or [] if p.get("image_id")])),
        "models": {"clip": names["clip"], "detector": names.get("detector"),
                   "random_weights": bool(doc.get("random_weights"))},
    }


def truth_flags(doc: dict[str, Any]) -> dict[str, Any]:
    """The listing's truth flags from a model result (``models.batch.ModelResult``); a result
    written before the flags existed has none (empty ``text_checks`` says so)."""
    return {"forced_fields": list(doc.get("forced_fields") or []), "forced_tokens": int(doc.get("forced_tokens") or 0),
            "conflicts": list(doc.get("conflicts") or []), "text_checks": dict(doc.get("text_checks") or {})}


def _from_reuse(session: Session, job: EnrichmentJob, product: Product,
                source_id: int) -> tuple[int, bool, dict[str, Any]]:
    """An identical image already enriched by the same models: copy, no model work."""
    src = listings.get(session, source_id)
    assert src is not None
    listing_id, created = listings.insert_listing(session, dict(
        tenant_id=job.tenant_id, product_id=product.id, product_version=job.product_version,
        model_version_id=src.model_version_id, image_id=src.image_id, grounding_id=src.grounding_id,
        category=product.category, schema_id=src.schema_id, content=src.generated_content or src.content,
        dropped_attributes=src.dropped_attributes, model_output=src.model_output, model_input=src.model_input,
        model_versions={**src.model_versions, "reused_from_listing_id": src.id}, random_weights=src.random_weights,
        forced_fields=src.forced_fields, forced_tokens=src.forced_tokens, conflicts=src.conflicts,
        text_checks=src.text_checks))
    for emb in listings.embeddings_of(session, src.id):
        listings.insert_embedding(session, dict(
            tenant_id=job.tenant_id, product_id=product.id, listing_id=listing_id,
            model_version_id=emb.model_version_id, category=product.category, dims=emb.dims,
            image_embedding=emb.image_embedding, text_embedding=emb.text_embedding, text_input=emb.text_input))
    listings.insert_photo_embeddings(session, [dict(
        tenant_id=job.tenant_id, product_id=product.id, listing_id=listing_id, image_id=p.image_id,
        model_version_id=p.model_version_id, position=p.position, on_product=p.on_product,
        product_probability=p.product_probability, grounding_id=p.grounding_id, dims=p.dims, embedding=p.embedding)
        for p in listings.photo_embeddings_of(session, src.id)])
    g = listings.grounding(session, src.grounding_id)
    grounding = ({"box": g.box, "score": g.score, "fallback": g.fallback, "prompt": g.prompt} if g
                 else {"box": None, "score": None, "fallback": True, "prompt": ""})
    return listing_id, created, grounding


def _model_names(runtime: Runtime, session: Session, model_ids: dict[str, int]) -> dict[str, str]:
    """``{kind: "name@revision"}``; the registry is read only for ids this process has not named yet."""
    by_id = {mid: name for mid in set(model_ids.values()) if (name := runtime.model_names.get(mid)) is not None}
    if missing := set(model_ids.values()) - set(by_id):
        for mid, name in model_versions.display_names(session, missing).items():
            by_id[mid] = runtime.model_names.put(mid, name)
    return {kind: by_id.get(mid, str(mid)) for kind, mid in model_ids.items()}


def enriched_event(job: EnrichmentJob, product: Product, listing: Listing, grounding: dict[str, Any],
                   names: dict[str, str], version: int = ENRICHED_VERSION) -> dict[str, Any]:
    """``listing.enriched`` at contract ``version``: 2 (current) adds the truth flags; 1 is the
    same event without them, for consumers that validate strictly against version 1."""
    content = listing.content
    event = {
        "schema_version": version, "event_id": str(uuid.uuid4()), "event_type": "listing.enriched",
        "causation_id": str(job.event_id), "occurred_at": now_iso(), "tenant_id": job.tenant_id,
        "merchant_id": product.merchant_id,
        "product": {"external_id": product.external_id, "version": job.product_version},
        "listing": {"listing_id": listing.id, "category": listing.category, "schema_id": listing.schema_id,
                    "title": content["title"], "description": content["description"],
                    "attributes": content["attributes"], "status": listing.status,
                    "reused_from_listing_id": listing.model_versions.get("reused_from_listing_id")},
        "grounding": grounding,
        "duplicates": [d.as_event() for d in FetchedImages.of(job.work).duplicates],
        "models": {"detector": names["detector"], "vlm": names["vlm"], "clip": names["clip"],
                   "random_weights": listing.random_weights},
    }
    if version >= 2:
        checks = listing.text_checks or {}
        event["listing"].update(
            forced_fields=list(listing.forced_fields or []), forced_tokens=int(listing.forced_tokens or 0),
            conflicts=list(listing.conflicts or []),
            text_checks={"retried": bool(checks.get("retried")), "repaired": list(checks.get("repaired") or [])})
    return event


def persist(runtime: Runtime, job_id: int, task_id: str) -> int | None:
    """Returns the listing id, or None when the job had already ended (a duplicate delivery).

    ``listing.enriched`` is published once per listing row: a job that finds its listing already
    there (the reconciler re-ran a product to add an embedding of a new clip version, say) records
    what is new and finishes without announcing the same listing again."""
    started = time.perf_counter()
    with job_session(runtime.session_factory, job_id) as session:
        job = jobs.claim(session, job_id, Stage.persist, task_id, runtime.retry.max_stage_attempts)
        if job is None:
            return None
        product = products.get(session, job.product_id)  # as claim locked it: this job's version
        assert product is not None
        reuse = FetchedImages.of(job.work).reuse_listing_id
        doc = None if reuse else json.loads(runtime.blobs.get(ModelOutput.of(job.work).result_uri))
        if doc is not None and doc.get("stages") and not generates_listing(frozenset(doc["stages"])):
            return _persist_indexed(runtime, session, job, product, doc, started)
        if reuse:
            listing_id, created, grounding = _from_reuse(session, job, product, reuse)
        else:
            assert doc is not None
            listing_id, created, grounding = _from_result(session, doc, job, product)
        listing = listings.get(session, listing_id)
        assert listing is not None
        tracing.annotate(**{f"catalog.model_version.{kind}": listing.model_versions.get(kind)
                            for kind in ("detector", "vlm", "clip")}, **{"catalog.listing_id": listing_id})
        if created:
            names = _model_names(runtime, session,
                                 {k: listing.model_versions[k] for k in ("detector", "vlm", "clip")})
            enqueue(session, "listing.enriched", enriched_event(job, product, listing, grounding, names,
                                                                   runtime.enriched_event_version),
                    tenant_id=job.tenant_id)
        jobs.finish(session, job, listing_id=listing_id, timings={"persist": (time.perf_counter() - started) * 1000})
        faults.hit("persist.before_commit", job_id=job_id)
    log.info("persist.done", job_id=job_id, listing_id=listing_id, reused=bool(reuse), new_listing=created)
    return listing_id


def _persist_indexed(runtime: Runtime, session: Session, job: EnrichmentJob, product: Product,
                     doc: dict[str, Any], started: float) -> int:
    """Persist of a policy without a listing, in the caller's transaction: vectors, the job done and,
    for a new record, ``product.indexed`` in the outbox (a redelivery or a reconciler re-run finds the
    record there and announces nothing again)."""
    listing_id, created = _from_embeddings(session, doc, job, product)
    if created:
        ids = {k: v for k, v in (doc.get("model_versions") or {}).items() if k == "clip" or
               (k == "detector" and EnrichStage.grounding.value in doc["stages"])}
        names = _model_names(runtime, session, ids)
        enqueue(session, "product.indexed", indexed_event(job, product, listing_id, doc, names), tenant_id=job.tenant_id)
    jobs.finish(session, job, listing_id=listing_id, timings={"persist": (time.perf_counter() - started) * 1000})
    faults.hit("persist.before_commit", job_id=job.id)
    tracing.annotate(**{"catalog.listing_id": listing_id, "catalog.policy": policy_name(frozenset(doc["stages"]))})
    log.info("persist.indexed", job_id=job.id, listing_id=listing_id, new_record=created,
             policy=policy_name(frozenset(doc["stages"])))
    return listing_id
