"""The Celery application. Importing this module never touches CUDA or loads a model: workers
build their runtime after fork (``worker_process_init``), and models load on first use."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from celery import Celery, signals

from workers.broker import broker_kind, broker_url
from workers.settings import Settings, get_settings
from workers.topology import TaskQueue, Topology, build_topology

# Every task module, imported by the worker at start: none of them imports torch (the GPU stage's
# model stack is imported by the model thread on first use).
TASK_MODULES = ["tasks.pipeline.tasks", "tasks.feedback.tasks", "tasks.maintenance.tasks"]


def celery_config(settings: Settings) -> dict[str, Any]:
    url = broker_url(settings)
    kind = broker_kind(url)
    topo = build_topology(settings, rabbitmq=kind == "rabbitmq")
    w = settings.workers
    transport: dict[str, Any] = {}
    if kind == "rabbitmq":
        transport["confirm_publish"] = True
    if kind in {"redis", "sqs"}:
        transport["visibility_timeout"] = settings.broker.visibility_timeout_s
    from celery.schedules import schedule

    return dict(
        broker_url=url,
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport,
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        task_track_started=False,
        task_soft_time_limit=w.soft_time_limit_s,
        task_time_limit=w.time_limit_s,
        task_queues=topo.task_queues,
        task_default_queue=topo.cpu.name,
        task_default_exchange=topo.tasks.name,
        task_default_exchange_type="topic",
        task_default_routing_key="cpu",
        task_create_missing_queues=False,
        task_routes=(_route,),
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        worker_enable_remote_control=kind != "embedded",
        worker_cancel_long_running_tasks_on_connection_loss=True,
        beat_schedule=_beat_schedule(settings, schedule),
        timezone="UTC",
    )


def _beat_schedule(settings: Settings, schedule: Any) -> dict[str, Any]:
    entries = {
        "relay-outbox": {"task": "catalog.relay_outbox", "schedule": schedule(30.0)},
        "reconcile-coverage": {"task": "catalog.reconcile", "schedule": schedule(settings.workers.reconcile_interval_s)},
        "retrain-build-pairs": {"task": "catalog.retrain.build_pairs",
                                "schedule": schedule(settings.workers.retrain_interval_s)},
    }
    w = settings.workers
    if w.embedder_retrain_interval_s:
        entries["retrain-finetune-embedder"] = {
            "task": "catalog.retrain.finetune_embedder", "schedule": schedule(w.embedder_retrain_interval_s),
            "kwargs": {"model_store_uri": settings.model_store_uri, "min_rows": w.embedder_retrain_min_rows,
                       "holdout_fraction": w.retrain_holdout_fraction, "window_days": w.retrain_window_days,
                       "settle_s": w.retrain_settle_s,
                       "epochs": w.embedder_retrain_epochs, "margin": settings.models.promotion_margin}}
    if settings.retention.enabled:
        # The policy travels with the message: the worker that runs it needs no retention settings.
        entries["prune-bookkeeping"] = {
            "task": "catalog.prune", "schedule": schedule(settings.retention.interval_s),
            "kwargs": settings.retention.model_dump(exclude={"enabled", "interval_s"})}
    return entries


@lru_cache(maxsize=4)
def _topology(broker: str, namespace: str) -> Topology:
    return build_topology(get_settings(), rabbitmq=broker_kind(broker) == "rabbitmq")


def _route(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any) -> dict[str, Any] | None:
    """Send each catalog task to the broker queue of its logical queue (cpu or gpu)."""
    logical = getattr(task, "logical_queue", None) if task is not None else None
    if logical is None:
        logical = getattr(app.tasks.get(name), "logical_queue", TaskQueue.cpu.value)
    topo = _topology(app.conf.broker_url, get_settings().broker.namespace)
    return {"queue": topo.task_queue(TaskQueue(logical)), "exchange": topo.tasks.name, "routing_key": logical}


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    celery = Celery("catalog")
    celery.conf.update(celery_config(settings))
    celery.conf.include = list(TASK_MODULES)
    return celery


app = create_app()


def send_task(name: str, **options: Any) -> Any:
    """How this process sends a stage hand-off: handed to the outbox publisher, which never imports
    the app itself."""
    return app.send_task(name, **options)


@signals.worker_process_init.connect
def _init_process(**_: Any) -> None:
    """Each forked child builds its own runtime (database pool, storage, publisher)."""
    from workers.wiring import install_from_settings

    install_from_settings(send_task=send_task)
    _start_tracing()


def _start_tracing() -> None:
    """After fork: the SDK's export thread must belong to the process that records the spans."""
    from tasks import tracing
    from workers.settings import otel_traces_requested

    tracing.configure(otel_traces_requested(), service_name="catalog-enrich")


@signals.worker_process_shutdown.connect
def _child_exited(pid: int | None = None, **_: Any) -> None:
    from workers.metrics import child_exited

    if pid is not None:
        child_exited(pid)


@signals.beat_init.connect
def _beat_metrics(**_: Any) -> None:
    from workers import metrics

    metrics.start(get_settings(), "beat", broker=True)


@signals.worker_init.connect
def _init_worker(sender: Any = None, **_: Any) -> None:
    from workers.logs import configure_logging

    settings = get_settings()
    configure_logging(json=settings.is_production, level=settings.log_level, force=True)
    # solo/threads pools do not fork: their runtime is installed once, here. Prefork children
    # install theirs after fork (worker_process_init) so no connection is shared across a fork.
    pool_cls = getattr(sender, "pool_cls", None)
    name = pool_cls if isinstance(pool_cls, str) else f"{getattr(pool_cls, '__module__', '')}.{getattr(pool_cls, '__name__', '')}"
    if "prefork" not in name.lower():
        from workers.wiring import install_from_settings

        install_from_settings(send_task=send_task)
        _start_tracing()
