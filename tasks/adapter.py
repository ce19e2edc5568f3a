"""The one house decorator for tasks, and the failure policy every job stage shares.

``catalog_task`` sets the stable dotted name, the logical queue (the app maps it to a broker
queue), late acks, reject-on-worker-lost, time limits (from the app config) and binds the log
context. ``run_job_stage`` turns exceptions into the pipeline's semantics: transient errors are
retried with exponential backoff and full jitter; permanent ones (and exhausted retries) end the
job as failed with a documented code and publish ``listing.failed``.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable
from typing import Any, TypeVar

import structlog
from celery import Task, shared_task
from celery.exceptions import Retry, SoftTimeLimitExceeded
from sqlalchemy.exc import DBAPIError, OperationalError

from db.engine import job_session
from tasks.errors import ErrorCode, PipelineError
from tasks.runtime import Runtime, get_runtime

log = structlog.get_logger(__name__)
T = TypeVar("T")

TASK_PREFIX = "catalog."


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
