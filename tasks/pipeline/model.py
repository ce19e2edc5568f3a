"""The GPU stage: ground → describe → verify → embed, batched across products.

``run_model_batch`` is the pure batch function the micro-batcher calls. One item's bad input is
that item's error; an accelerator OOM splits the batch and retries the halves, down to one item.
``model_stage`` is the per-product step a task runs: claim, submit to the batcher, store the
result document (vectors included) in blob storage, and hand its URI to the persist stage.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import structlog
import torch

from db.engine import job_session
from db.enums import Stage
from db.tables import EnrichmentJob, Product
from models.categories import resolve_schema
from models.embeddings import visual_description
from models.errors import ModelLayerError
from models.factory import ModelBundle
from models.images import decode_image
from models.listing import ListingRequest
from tasks import faults
from tasks.pipeline import jobs
from tasks.errors import ErrorCode, PipelineError
from tasks.pipeline.outbox import enqueue_task
from tasks.runtime import Runtime
from tasks.io.blobs import result_key

log = structlog.get_logger(__name__)


@dataclass
class ModelItem:
    job_id: int
    image: Any  # PIL.Image (RGB), decoded once in the task thread
    category: str
    title: str
    description: str
    attributes: dict[str, Any]
    locale: str
    unknown_category: str = "generic"


@dataclass
class ModelResult:
    job_id: int
    error: tuple[str, str, bool] | None = None  # (code, detail, retryable)
    schema_id: str | None = None
    grounding: dict[str, Any] = field(default_factory=dict)
    model_output: dict[str, Any] = field(default_factory=dict)
    model_input: dict[str, Any] = field(default_factory=dict)
    content: dict[str, Any] = field(default_factory=dict)
    dropped: dict[str, Any] = field(default_factory=dict)
    image_embedding: list[float] = field(default_factory=list)
    text_embedding: list[float] = field(default_factory=list)
    text_input: str = ""
    timings_ms: dict[str, float] = field(default_factory=dict)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _run(models: ModelBundle, items: list[ModelItem]) -> list[ModelResult]:
    faults.hit("model.batch", size=len(items), job_ids=[i.job_id for i in items])
    results = [ModelResult(job_id=i.job_id) for i in items]
    live: list[int] = []
    schemas = []
    for idx, item in enumerate(items):
        try:
            schemas.append(resolve_schema(item.category, unknown=item.unknown_category))
            live.append(idx)
        except ModelLayerError as exc:
            results[idx].error = (exc.code, exc.detail, exc.retryable)
    if not live:
        return results
    imgs = [items[i].image for i in live]
    timer = time.perf_counter()
    groundings = models.grounder.predict(imgs, categories=[schemas[n].name for n in range(len(live))])
    t_ground = (time.perf_counter() - timer) * 1000
    crops = [g.crop for g in groundings]
    timer = time.perf_counter()
    generated = models.generator.predict([
        ListingRequest(image=crops[n], schema=schemas[n], merchant_title=items[i].title,
                       merchant_description=items[i].description, merchant_attributes=items[i].attributes,
                       locale=items[i].locale) for n, i in enumerate(live)])
    t_describe = (time.perf_counter() - timer) * 1000
    timer = time.perf_counter()
    verified = models.verifier.verify(crops, [g.output for g in generated], schemas,
                                      [items[i].attributes for i in live])
    t_verify = (time.perf_counter() - timer) * 1000
    timer = time.perf_counter()
    image_vecs = models.embedder.embed_images(crops)
    texts = []
    for n, v in enumerate(verified):
        visual = {k: a["value"] for k, a in v.content["attributes"].items() if k in schemas[n].visual_attributes}
        texts.append(visual_description(schemas[n].name, visual))
    text_vecs = models.embedder.embed_texts(texts)
    t_embed = (time.perf_counter() - timer) * 1000
    share = 1 / len(live)
    for n, i in enumerate(live):
        g = groundings[n]
        results[i] = ModelResult(
            job_id=items[i].job_id, schema_id=schemas[n].schema_id,
            grounding={"box": list(g.box) if g.box else None, "score": g.score, "fallback": g.fallback, "prompt": g.prompt},
            model_output=generated[n].output, model_input=generated[n].model_input,
            content=verified[n].content, dropped=verified[n].dropped,
            image_embedding=[float(x) for x in image_vecs[n]], text_embedding=[float(x) for x in text_vecs[n]],
            text_input=texts[n],
            timings_ms={"ground": t_ground * share, "describe": t_describe * share, "verify": t_verify * share,
                        "embed": t_embed * share},
        )
    return results


def run_model_batch(models: ModelBundle, items: list[ModelItem]) -> list[ModelResult]:
    try:
        return _run(models, items)
    except Exception as exc:  # noqa: BLE001
        if _is_oom(exc):
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(items) == 1:
                log.error("model.oom", job_id=items[0].job_id)
                return [ModelResult(job_id=items[0].job_id, error=(ErrorCode.model_out_of_memory.value,
                                                                   "accelerator out of memory at batch size 1", True))]
            half = len(items) // 2
            log.warning("model.oom_split", size=len(items), into=[half, len(items) - half])
            return run_model_batch(models, items[:half]) + run_model_batch(models, items[half:])
        if len(items) > 1:  # isolate the item that broke the batch
            log.warning("model.batch_failed_isolating", size=len(items), error=str(exc)[:200])
            return [r for item in items for r in run_model_batch(models, [item])]
        log.exception("model.item_failed", job_id=items[0].job_id)
        return [ModelResult(job_id=items[0].job_id, error=(ErrorCode.model_error.value, f"{type(exc).__name__}: {exc}"[:500], False))]


def model_stage(runtime: Runtime, job_id: int, task_id: str) -> bool:
    """Run the model work of one job through the batcher. False when there was nothing to do."""
    with job_session(runtime.session_factory, job_id) as session:
        job = jobs.claim(session, job_id, Stage.model, task_id, runtime.retry.max_stage_attempts)
        if job is None:
            return False
        product = session.get(Product, job.product_id)
        assert product is not None
        uri = job.work["primary_uri"]
        item_fields = dict(category=product.category, title=product.title, description=product.description,
                           attributes=dict(product.attributes), locale=product.locale)
    image = decode_image(runtime.blobs.get(uri), runtime.image_limits).image
    result = runtime.batcher.run(ModelItem(job_id=job_id, image=image, unknown_category=runtime.unknown_category,
                                           **item_fields))
    if result.error is not None:
        code, detail, retryable = result.error
        raise PipelineError(ErrorCode(code), detail, retryable=retryable)
    doc_uri = runtime.blobs.put(result_key(job_id), json.dumps(asdict(result)).encode())
    with job_session(runtime.session_factory, job_id) as session:
        job = session.get(EnrichmentJob, job_id, with_for_update=True)
        if job is None or job.status in jobs.FINAL:
            return False
        jobs.advance(session, job, Stage.persist, work={"result_uri": doc_uri}, timings=result.timings_ms)
        enqueue_task(session, "catalog.persist", job_id, queue="cpu", tenant_id=job.tenant_id)
    return True
