"""Settings → the objects a worker process runs with: the task runtime (installed after fork),
the fetch policy, the model configuration, fault plans. Heavy libraries are imported only by what
uses them: the model bundle is built lazily, and only a process that loaded torch limits its threads."""

from __future__ import annotations

from datetime import timedelta

from workers.logs import get_logger
from workers.settings import Settings, get_settings

log = get_logger(__name__)


def model_config(settings: Settings):  # noqa: ANN201
    from models.config import ModelConfig

    m = settings.models
    return ModelConfig(profile=m.profile.value, device=m.device, detector=m.detector, vlm=m.vlm, clip=m.clip,
                       cache_dir=settings.model_cache_dir, s3_endpoint_url=settings.storage.s3_endpoint_url,
                       detection_threshold=m.detection_threshold, crop_padding=m.crop_padding,
                       verify_margin=m.verify_margin, conflict_margin=m.conflict_margin,
                       max_new_tokens=m.max_new_tokens, grammar_threads=m.grammar_threads,
                       grammar_overlap=m.grammar_overlap)


def fetch_policy(settings: Settings):  # noqa: ANN201
    from tasks.io.fetcher import FetchPolicy

    s = settings.storage
    return FetchPolicy(allow_file_urls=s.allow_file_urls, allow_private_addresses=s.allow_private_addresses,
                       allow_http=s.allow_http, allowed_buckets=tuple(s.allowed_buckets),
                       max_bytes=s.max_image_bytes, timeout_s=s.fetch_timeout_s,
                       total_timeout_s=s.fetch_total_timeout_s, max_redirects=s.max_redirects,
                       require_merchant_prefix=s.require_merchant_prefix, file_roots=tuple(s.file_roots),
                       s3_endpoint_url=s.s3_endpoint_url, s3_region=s.s3_region)


def retrain_config(settings: Settings):  # noqa: ANN201
    from tasks.feedback.pairs import RetrainConfig

    w = settings.workers
    return RetrainConfig(window_days=w.retrain_window_days, merchant_cap=w.retrain_merchant_cap,
                         holdout_fraction=w.retrain_holdout_fraction, settle=timedelta(seconds=w.retrain_settle_s))


def fault_plan(settings: Settings):  # noqa: ANN201
    """Test-only fault injection; None (the production case) unless an ENRICH_FAULTS__ setting is on."""
    from tasks.faults import FaultPlan

    f = settings.faults
    if not f.active:
        return None
    log.warning("faults.enabled", **f.model_dump())
    return FaultPlan(kill_after_commit=f.kill_after_commit, crash_on_task_for_external_id=f.crash_on_task_for_external_id,
                     oom_above_batch=f.oom_above_batch, sleep_in_model_s=f.sleep_in_model_s,
                     sleep_before_persist_commit_s=f.sleep_before_persist_commit_s, trace=f.trace,
                     oom_error=_torch_oom)


def _torch_oom(message: str) -> BaseException:
    """A real ``torch.cuda.OutOfMemoryError``: the point is hit in the model thread, where torch is loaded."""
    import torch

    return torch.cuda.OutOfMemoryError(message)


def build_runtime(settings: Settings, send_task=None):  # noqa: ANN001, ANN201
    from models.images import ImageLimits
    from tasks.io.fetcher import ImageFetcher
    from tasks.runtime import RetryPolicy, Runtime
    from tasks.io.blobs import open_blob_store
    from workers.database import get_session_factory, reset_engine
    from workers.publisher import KombuEventPublisher
    from workers.storage import s3_client
    from workers.supervision import exit_for_restart

    reset_engine()  # never reuse a connection pool inherited across fork
    config = model_config(settings)
    w = settings.workers
    return Runtime(
        session_factory=get_session_factory(),
        blobs=open_blob_store(settings.originals_uri, s3_client_factory=lambda: s3_client(settings)),
        fetcher=ImageFetcher(fetch_policy(settings), s3_client_factory=lambda: s3_client(settings)),
        publisher=KombuEventPublisher(settings, send_task),
        image_limits=ImageLimits(max_pixels=settings.storage.max_pixels, max_frames=settings.storage.max_frames),
        models_factory=lambda model_config: _build_models(model_config, settings.workers.cpu_threads),
        model_config=config, pinned_models=frozenset(settings.models.pinned),
        registry_poll_s=settings.models.registry_poll_s,
        retry=RetryPolicy(max_retries=w.max_retries, backoff_s=w.retry_backoff_s, backoff_max_s=w.retry_backoff_max_s,
                          max_stage_attempts=w.max_retries + settings.broker.delivery_limit + 1),
        unknown_category=settings.models.unknown_category,
        enriched_event_version=settings.workers.enriched_event_version, max_images=settings.models.max_images,
        enrichment=settings.enrichment.table(),
        batch_size=w.batch_size, batch_max_wait_ms=w.batch_max_wait_ms,
        heartbeat_s=w.heartbeat_s, stall_after_s=w.stall_allowance_s, queued_stall_after_s=w.queued_stall_after_s,
        model_wait_s=float(w.soft_time_limit_s), batch_hang_s=float(w.time_limit_s),
        on_batcher_hung=lambda: exit_for_restart("a model batch ran past the hard time limit (hung model thread)"),
        datasets=open_blob_store(settings.datasets_uri, s3_client_factory=lambda: s3_client(settings)),
        retrain=retrain_config(settings),
        faults=fault_plan(settings),
    )


def _build_models(config, threads: int):  # noqa: ANN001, ANN202
    """The model bundle, built on first use in this process; torch gets the worker's thread budget."""
    import torch

    from models.factory import build_models

    if threads > 0:
        torch.set_num_threads(threads)
    return build_models(config)


def limit_cpu_threads(threads: int) -> None:
    """Several worker processes share the cores; library thread pools sized to all cores each
    oversubscribe them (measured here: 4x slower model batches with default threads). torch is
    limited only where it is already imported (a GPU worker): importing it here would load the ML
    stack into every CPU worker and beat; ``models`` applies the same limit when it loads torch."""
    if threads <= 0:
        return
    import sys

    import cv2

    cv2.setNumThreads(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


def stall_thresholds(settings: Settings) -> dict[str, timedelta]:
    """The reconciler's stall rule from settings, for every caller (beat's task, `enrich reconcile`,
    `enrich status`): ``stalled_after`` and ``queued_after`` keyword arguments."""
    w = settings.workers
    return {"stalled_after": timedelta(seconds=w.stall_allowance_s),
            "queued_after": timedelta(seconds=w.queued_stall_after_s)}


def install_from_settings(settings: Settings | None = None, *, send_task=None) -> None:  # noqa: ANN001
    """``send_task``: how stage hand-offs leave this process (``workers.celery_app.send_task``)."""
    from tasks.runtime import install_runtime

    settings = settings or get_settings()
    limit_cpu_threads(settings.workers.cpu_threads)
    install_runtime(build_runtime(settings, send_task))
    log.info("runtime.installed", profile=settings.models.profile.value, device=settings.models.device)
