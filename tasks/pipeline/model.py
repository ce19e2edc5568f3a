"""The GPU stage, per product: claim, submit to the micro-batcher, store the result, hand off.

The batch itself (ground → describe → verify → embed across products, OOM splitting) is the pure
function ``models.batch.run_model_batch``; this module never imports torch, so it can be imported
(as the Celery task module is) by workers that never run a model.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import structlog

from db.engine import job_session
from db.enums import Stage
from db.repositories import jobs as job_rows
from db.repositories import products
from models.batch import ModelItem
from models.images import decode_image
from tasks import tracing
from tasks.errors import ErrorCode, PipelineError
from tasks.io.blobs import result_key
from tasks.pipeline import jobs
from tasks.pipeline.work import EnrichRequest, FetchedImages, ModelOutput
from tasks.runtime import Runtime

log = structlog.get_logger(__name__)


def model_stage(runtime: Runtime, job_id: int, task_id: str) -> bool:
    """Run the model work of one job through the batcher. False when there was nothing to do."""
    with job_session(runtime.session_factory, job_id) as session:
        job = jobs.claim(session, job_id, Stage.model, task_id, runtime.retry.max_stage_attempts)
        if job is None:
            return False
        product = products.get(session, job.product_id)  # as claim locked it: this job's version
        assert product is not None
        photos = FetchedImages.of(job.work).photos(runtime.max_images)
        # The policy is resolved here, where the work is done, from the settings this worker runs with and
        # the event's hint; the result records it, and persist writes what the result says ran.
        stages = runtime.enrichment.resolve(job.tenant_id, product.category, EnrichRequest.of(job.work).stages_hint)
        item_fields = dict(category=product.category, title=product.title, description=product.description,
                           attributes=dict(product.attributes), locale=product.locale, stages=stages)
    # Decoded here, in the task thread, once each (fetch already refused what does not decode).
    images = [decode_image(runtime.blobs.get(uri), runtime.image_limits).image for _, uri in photos]
    result = runtime.batcher.run(ModelItem(job_id=job_id, image=images[0], unknown_category=runtime.unknown_category,
                                           extra_images=images[1:], image_ids=tuple(i for i, _ in photos),
                                           **item_fields), timeout=runtime.model_wait_s)
    tracing.annotate(**{f"catalog.model_version.{kind}": vid for kind, vid in result.model_versions.items()})
    if result.error is not None:
        code, detail, retryable = result.error
        raise PipelineError(ErrorCode(code), detail, retryable=retryable)
    doc_uri = runtime.blobs.put(result_key(job_id), json.dumps(asdict(result)).encode())
    with job_session(runtime.session_factory, job_id) as session:
        job = job_rows.lock(session, job_id)
        if job is None or job.status in jobs.FINAL:
            return False
        nxt = jobs.STAGES[Stage.model].next
        assert nxt is not None
        jobs.hand_off(session, job, nxt, ModelOutput(doc_uri), timings=result.timings_ms)
    return True
