"""The Celery adapter: the house decorators and the failure policy every job stage shares.

``catalog_task`` sets the stable dotted name, the logical queue (the app maps it to a broker
queue), late acks, reject-on-worker-lost, time limits (from the app config) and binds the log
context. ``stage_task`` builds on it for the pipeline stages: name and queue come from the stage
table (``tasks.pipeline.jobs.STAGES``), and it owns everything around the stage function: the
failure policy (``run_job_stage``: transient errors are retried with exponential backoff and full
jitter; permanent ones, and exhausted retries, end the job as failed with a documented code and
publish ``listing.failed``), the ``stage.committed`` fault point, the outbox relay that sends what
the stage committed, and one timing line per run. The claim stays in the stage function, in the
same transaction as the stage's first read (for persist: as its writes), so it costs no extra
round trip; while the stage runs, ``ClaimHeartbeat`` keeps that claim fresh from a small thread
so the reconciler can tell a live task from a dead one.
"""

from __future__ import annotations

import functools
import math
import random
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import structlog
from celery import Task, shared_task
from celery.exceptions import Retry, SoftTimeLimitExceeded
from sqlalchemy.exc import DBAPIError, OperationalError

from db.engine import job_session
from db.enums import Stage
from models.batch import BatcherUnavailable
from tasks import faults, metrics, tracing
from tasks.errors import ErrorCode, PipelineError
from tasks.runtime import Runtime, get_runtime

log = structlog.get_logger(__name__)
T = TypeVar("T")

TASK_PREFIX = "catalog."
StageFn = Callable[[Runtime, int, str], Any]
"""A stage body: ``(runtime, job_id, task_id) -> result``; a falsy result means nothing was committed."""


def catalog_task(name: str, *, queue: str, **options: Any) -> Callable[[Callable[..., T]], Task]:
    """Register ``catalog.<name>`` on logical queue ``queue`` ('cpu' or 'gpu')."""

    def decorate(fn: Callable[..., T]) -> Task:
        @functools.wraps(fn)
        def body(self: Task, *args: Any, **kwargs: Any) -> T:
            fields = {"task_id": self.request.id, "task": name}
            if args and isinstance(args[0], int):
                fields["job_id"] = args[0]
            structlog.contextvars.bind_contextvars(**fields)
            try:
                return fn(self, *args, **kwargs)
            finally:
                structlog.contextvars.unbind_contextvars(*fields)

        task = shared_task(bind=True, name=TASK_PREFIX + name, acks_late=True, reject_on_worker_lost=True,
                           **options)(body)
        task.logical_queue = queue  # type: ignore[attr-defined]
        return task

    return decorate


def backoff_seconds(retries: int, runtime: Runtime) -> int:
    """Exponential backoff with jitter: uniform(cap/4, cap), cap = min(max, base * 2**retries).

    Whole seconds, at least 1: RabbitMQ native delayed delivery (used for quorum queues) has
    one-second resolution and refuses a zero countdown.
    """
    cap = min(runtime.retry.backoff_max_s, runtime.retry.backoff_s * (2 ** retries))
    return max(1, math.ceil(random.uniform(cap / 4, cap)))


def _is_transient_db(exc: BaseException) -> bool:
    return isinstance(exc, OperationalError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated)


def relay_outbox(runtime: Runtime) -> None:
    """Publish what the last commit wrote to the outbox; failures wait for the periodic relay."""
    from tasks.pipeline.outbox import relay

    try:
        relay(runtime.session_factory, runtime.publisher)
    except Exception as exc:  # noqa: BLE001
        log.warning("outbox.relay_deferred", error=str(exc)[:200])


def run_job_stage(task: Task, job_id: int, stage: Callable[[Runtime], T]) -> T | None:
    runtime = get_runtime()
    try:
        return stage(runtime)
    except Retry:
        raise
    except PipelineError as exc:
        error = exc
    except SoftTimeLimitExceeded:
        error = PipelineError(ErrorCode.internal_error, "stage exceeded its soft time limit", retryable=True)
    except BatcherUnavailable as exc:  # the model stage's bounded wait on the batcher (threads pool: no Celery limits)
        error = PipelineError(ErrorCode.internal_error, str(exc), retryable=True)
    except Exception as exc:  # noqa: BLE001
        if _is_transient_db(exc):
            error = PipelineError(ErrorCode.internal_error, f"database unavailable: {str(exc).splitlines()[0][:200]}",
                                  retryable=True)
        else:
            log.exception("stage.crashed", job_id=job_id)
            error = PipelineError(ErrorCode.internal_error, f"{type(exc).__name__}: {exc}"[:500])
    if error.retryable and task.request.retries < runtime.retry.max_retries:
        delay = backoff_seconds(task.request.retries, runtime)
        log.warning("stage.retry", job_id=job_id, code=error.code.value, attempt=task.request.retries + 1,
                    countdown=round(delay, 2), detail=error.detail[:200])
        raise task.retry(countdown=delay, exc=error, max_retries=runtime.retry.max_retries)
    from tasks.pipeline import jobs

    with job_session(runtime.session_factory, job_id) as session:
        jobs.fail(session, job_id, error.code, error.detail, retryable=error.retryable)
    relay_outbox(runtime)
    return None


class ClaimHeartbeat:
    """While a stage runs, refresh its claim every ``runtime.heartbeat_s`` (``jobs.heartbeat``: only
    while this task id still holds the job's current stage), each beat in its own short
    transaction, from a daemon thread that ends with the stage. A failed beat (a database blip)
    is logged and never fails the task; the next beat tries again."""

    def __init__(self, runtime: Runtime, job_id: int, stage: Stage, task_id: str) -> None:
        self._runtime, self._job_id, self._stage, self._task_id = runtime, job_id, stage, task_id
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.beats = 0

    def __enter__(self) -> ClaimHeartbeat:
        if self._runtime.heartbeat_s > 0:
            self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self._job_id}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)  # a beat blocked on the database finishes on its own

    def _run(self) -> None:
        from tasks.pipeline import jobs

        while not self._stop.wait(self._runtime.heartbeat_s):
            try:
                with job_session(self._runtime.session_factory, self._job_id) as session:
                    held = jobs.heartbeat(session, self._job_id, self._stage, self._task_id)
                self.beats += held
            except Exception as exc:  # noqa: BLE001 - a missed beat only makes the claim look older
                log.warning("stage.heartbeat_failed", job_id=self._job_id, stage=self._stage.value,
                            error=str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)


def stage_task(stage: Stage) -> Callable[[StageFn], Task]:
    """The Celery task of one pipeline stage; its name and queue come from the stage table."""
    from tasks.pipeline.jobs import STAGES

    spec = STAGES[stage]

    def decorate(fn: StageFn) -> Task:
        def body(self: Task, job_id: int) -> Any:
            started, cpu_started = time.perf_counter(), time.thread_time()
            incoming = tracing.parse(getattr(self.request, "traceparent", None),
                                     getattr(self.request, "tracestate", None))
            with tracing.stage_span(spec.task_name, incoming, **{"catalog.job_id": job_id,
                                                                 "catalog.stage": stage.value}) as span:
                with ClaimHeartbeat(get_runtime(), job_id, stage, self.request.id):
                    result = run_job_stage(self, job_id, lambda rt: fn(rt, job_id, self.request.id))
                if result:
                    faults.hit("stage.committed", stage=stage.value, job_id=job_id)
                # Always relay: also when this delivery found the stage already done, a crash between that
                # commit and its relay may have left the hand-off (or listing.enriched) in the outbox.
                relay_started = time.thread_time()
                relay_outbox(get_runtime())
                relay_cpu_s = time.thread_time() - relay_started
                tracing.set_attributes(span, **{"catalog.committed": bool(result)})
            took_s = time.perf_counter() - started
            metrics.task_ran(stage.value, took_s)
            # cpu_ms: this task thread's own CPU for the stage (claim, work, commit), relay_cpu_ms: the relay
            # after it. Neither counts other threads (the gpu worker's model thread, the claim heartbeat).
            log.info("stage.ran", stage=stage.value, job_id=job_id, committed=bool(result),
                     took_ms=round(took_s * 1000, 1),
                     cpu_ms=round((time.thread_time() - cpu_started - relay_cpu_s) * 1000, 2),
                     relay_cpu_ms=round(relay_cpu_s * 1000, 2))
            return result

        # Not functools.wraps: the task's signature is (self, job_id), not the stage function's.
        body.__name__, body.__qualname__, body.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
        body.__module__ = fn.__module__
        return catalog_task(spec.task_name.removeprefix(TASK_PREFIX), queue=spec.queue)(body)

    return decorate
