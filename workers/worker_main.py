"""Start a Celery worker (or the standalone intake loop) for the requested queues."""

from __future__ import annotations

import socket

from workers.logs import configure_logging, get_logger
from workers.settings import export_overrides, get_settings

log = get_logger(__name__)


def run_worker(queues: list[str], *, device: str | None, concurrency: int | None, loglevel: str,
               hostname: str | None) -> None:
    if device:
        export_overrides(ENRICH_MODELS__DEVICE=device)
    settings = get_settings()
    configure_logging(json=settings.is_production, level=loglevel, force=True)
    from workers import metrics

    metrics.start(settings, metrics.role_of(queues), broker="events" in queues)
    task_queues = [q for q in queues if q in ("cpu", "gpu")]
    if not task_queues:
        from workers.intake import StandaloneIntake

        log.info("worker.intake_only")
        StandaloneIntake(settings).run()
        return

    from workers.celery_app import app
    from workers.broker import broker_kind, broker_url
    from workers.topology import TaskQueue, build_topology

    topo = build_topology(settings, rabbitmq=broker_kind(broker_url(settings)) == "rabbitmq")
    declare_everything(topo)
    if "events" in queues:
        from workers.intake import IntakeStep

        app.steps["consumer"].add(IntakeStep)
    names = [topo.task_queue(TaskQueue(q)).name for q in task_queues]
    gpu = "gpu" in task_queues
    pool, size = worker_pool(gpu=gpu, batch_size=settings.workers.batch_size, concurrency=concurrency)
    node = hostname or f"{'+'.join(queues)}@{socket.gethostname()}"
    argv = ["worker", f"--queues={','.join(names)}", f"--pool={pool}", f"--concurrency={size}",
            f"--loglevel={loglevel}", f"--hostname={node}", "--without-gossip", "--without-mingle"]
    log.info("worker.start", queues=queues, pool=pool, concurrency=size)
    app.worker_main(argv)
    from workers.supervision import requested_exit_code

    if (code := requested_exit_code()) is not None:  # e.g. a hung model thread: the supervisor restarts us
        raise SystemExit(code)


def worker_pool(*, gpu: bool, batch_size: int, concurrency: int | None) -> tuple[str, int]:
    """(Celery pool, concurrency) of a worker. GPU: one process, a thread per in-flight product
    (prefetch 1 each) feeding one micro-batcher, two batches' worth of threads, so the next batch is
    claimed, decoded and queued while one runs (with one batch's worth the model thread sat idle
    about 0.2 s between batches: README, "GPU workers: pool and CUDA"). CPU: two prefork
    processes. ``concurrency`` overrides the size."""
    if gpu:
        return "threads", concurrency or 2 * batch_size
    return "prefork", concurrency or 2


def declare_everything(topo) -> None:  # noqa: ANN001
    """Declare the whole topology first: a worker binds every task queue to the delayed-delivery
    exchanges at start, including queues that only other workers consume."""
    from kombu import Connection

    from workers.broker import broker_url
    from workers.topology import declare

    import time

    for attempt in range(3):
        try:
            with Connection(broker_url()) as conn:
                conn.ensure_connection(max_retries=5)
                declare(conn, topo)
            return
        except Exception:  # noqa: BLE001 - e.g. two workers creating the embedded broker's tables at once
            if attempt == 2:
                raise
            time.sleep(0.5 + attempt)
