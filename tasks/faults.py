"""Fault injection for the reliability suite (tests/reliability). OFF unless a test turns it on.

The worker builds a ``FaultPlan`` from ``ENRICH_FAULTS__*`` (workers.settings.FaultSettings) and
puts it on the ``Runtime``; pipeline code calls ``hit(point, **ctx)`` at a few named points. With
no plan installed, or an empty one, ``hit`` returns at once and does nothing. Production never
sets these settings (``ENRICH_ENV=production`` refuses to start with any of them).

Points (called by the pipeline):

- ``fetch.claimed`` (``external_id``, ``job_id``): after the fetch claim committed. With
  ``crash_on_task_for_external_id`` the process dies by SIGKILL on every delivery (a poison message).
- ``model.batch`` (``size``, ``job_ids``): inside the model batch function, before any model runs.
  ``sleep_in_model_s`` holds the batch there; ``oom_above_batch`` raises a simulated
  ``torch.cuda.OutOfMemoryError`` (``oom_error``, given by the worker) for batches larger than N
  (the batch function splits them).
- ``persist.before_commit`` (``job_id``): inside the persist transaction, everything written, not yet
  committed. ``sleep_before_persist_commit_s`` holds it open there (to kill its connection).
- ``stage.committed`` (``stage``, ``job_id``): after a stage's transaction committed and before the
  task returns (so before the ack and before the next stage is dispatched or the outbox relayed).
  ``kill_after_commit=<stage>`` kills the process with SIGKILL there.

With ``trace`` every point reached logs one ``fault.point`` line, which the tests count (how many
model batches ran, and for which jobs).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

log = structlog.get_logger(__name__)

POINTS = frozenset({"fetch.claimed", "model.batch", "persist.before_commit", "stage.committed"})


class SimulatedFault(RuntimeError):
    """Raised only when a point is hit with a context that breaks its contract (a test bug)."""


class SimulatedOutOfMemory(RuntimeError):
    """A simulated accelerator OOM where torch is not at hand (its message says "out of memory")."""


@dataclass(frozen=True)
class FaultPlan:
    kill_after_commit: str | None = None
    crash_on_task_for_external_id: str | None = None
    oom_above_batch: int | None = None
    sleep_in_model_s: float = 0.0
    sleep_before_persist_commit_s: float = 0.0
    trace: bool = False
    # The exception a simulated OOM raises. The worker passes torch's OutOfMemoryError (it runs
    # where torch is loaded); this module never imports torch, so a plan built without it raises
    # SimulatedOutOfMemory, which the batch function recognises by its message the same way.
    oom_error: Callable[[str], BaseException] = field(default=lambda message: SimulatedOutOfMemory(message),
                                                     compare=False, repr=False)

    @property
    def active(self) -> bool:
        return bool(self.kill_after_commit or self.crash_on_task_for_external_id or self.oom_above_batch
                    or self.sleep_in_model_s > 0 or self.sleep_before_persist_commit_s > 0 or self.trace)

    def apply(self, point: str, ctx: dict[str, Any]) -> None:
        if point not in POINTS:
            raise SimulatedFault(f"unknown fault point {point!r}")
        if self.trace:
            log.info("fault.point", point=point, **ctx)
        if point == "fetch.claimed" and self.crash_on_task_for_external_id is not None \
                and ctx.get("external_id") == self.crash_on_task_for_external_id:
            _die(point, ctx)
        elif point == "model.batch":
            if self.sleep_in_model_s > 0:
                log.warning("fault.sleep", point=point, seconds=self.sleep_in_model_s, **ctx)
                time.sleep(self.sleep_in_model_s)
            if self.oom_above_batch is not None and int(ctx.get("size", 0)) > self.oom_above_batch:
                log.warning("fault.oom", point=point, limit=self.oom_above_batch, **ctx)
                raise self.oom_error(
                    f"CUDA out of memory (simulated by ENRICH_FAULTS__OOM_ABOVE_BATCH={self.oom_above_batch}, "
                    f"batch size {ctx.get('size')})")
        elif point == "persist.before_commit" and self.sleep_before_persist_commit_s > 0:
            log.warning("fault.sleep", point=point, seconds=self.sleep_before_persist_commit_s, **ctx)
            time.sleep(self.sleep_before_persist_commit_s)
        elif point == "stage.committed" and self.kill_after_commit is not None \
                and ctx.get("stage") == self.kill_after_commit:
            _die(point, ctx)


def _die(point: str, ctx: dict[str, Any]) -> None:
    """SIGKILL this process: no except/finally block, no atexit, no ack runs after this."""
    log.warning("fault.kill", point=point, pid=os.getpid(), **ctx)
    os.kill(os.getpid(), signal.SIGKILL)
    os._exit(137)  # not reached (SIGKILL to oneself is delivered at once); never fall through


def current_plan() -> FaultPlan | None:
    from tasks import runtime as rt

    installed = rt._runtime  # noqa: SLF001 - read without raising when no runtime is installed
    return installed.faults if installed is not None else None


def hit(point: str, **ctx: Any) -> None:
    """A named fault point. A no-op unless this process's runtime carries an active plan."""
    plan = current_plan()
    if plan is not None and plan.active:
        plan.apply(point, ctx)
