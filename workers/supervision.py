"""Leaving a worker process that can no longer do its work, so its supervisor starts a fresh one.

The GPU worker's model thread can hang (a driver or kernel that never returns). A thread cannot be
killed, and a second model thread beside the stuck one would keep its accelerator memory and pile
up with every further hang, so the micro-batcher's watchdog calls ``exit_for_restart`` instead:
a warm shutdown with exit code 70 (the consumer stops taking messages; the tasks still running
were already failed by the watchdog and retry), and a hard exit after ``grace_s`` should that
shutdown itself hang. Messages the process still held unacked are redelivered by the broker and
re-claimed by the same task ids, as after a ``kill -9``. The orchestrator's restart policy (k8s
Deployment; ``restart: unless-stopped`` under compose) starts the worker again.
"""

from __future__ import annotations

import os
import threading

from workers.logs import get_logger

log = get_logger(__name__)

EXIT_FOR_RESTART = 70  # EX_SOFTWARE: not a clean stop, so "restart on failure" policies restart it
_requested: int | None = None


def exit_for_restart(reason: str, *, grace_s: float = 60.0) -> None:
    """Stop this worker warm with a non-zero exit code; force the exit after ``grace_s``."""
    global _requested
    if _requested is not None:
        return
    _requested = EXIT_FOR_RESTART
    log.critical("worker.exit_for_restart", reason=reason, grace_s=grace_s, exit_code=EXIT_FOR_RESTART)
    from celery.worker import state

    state.should_stop = EXIT_FOR_RESTART  # the consumer loop sees it and shuts the worker down warm
    timer = threading.Timer(grace_s, _force_exit)
    timer.daemon = True
    timer.start()


def requested_exit_code() -> int | None:
    """The exit code ``exit_for_restart`` asked for, once the worker's own shutdown has returned."""
    return _requested


def _force_exit() -> None:
    log.critical("worker.exit_forced", exit_code=EXIT_FOR_RESTART)
    os._exit(EXIT_FOR_RESTART)
