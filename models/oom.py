"""Accelerator out-of-memory: how it is recognised, and the one rule for splitting work around it.

Both the model wrappers (one model over a slice of a batch) and the pipeline's batch function
(a whole batch of products) halve what they were given and retry each half, down to one item.
Nothing here imports torch: the pipeline recognises an OOM in processes that never load it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import structlog

T = TypeVar("T")
log = structlog.get_logger(__name__)


def is_oom(exc: BaseException) -> bool:
    """torch's OutOfMemoryError, or any error whose message says the device ran out of memory."""
    if type(exc).__name__ == "OutOfMemoryError" and type(exc).__module__.startswith("torch"):
        return True
    return "out of memory" in str(exc).lower()


def halve_on_oom(run: Callable[[int, int], list[T]], n: int, *, on_oom: Callable[[], None] | None = None,
                 at_one: Callable[[BaseException], BaseException] | None = None) -> list[T]:
    """Run ``run(start, stop)`` over ``[0, n)``; on OOM split the slice in two and retry each half.

    ``on_oom`` runs after every OOM (free the allocator cache); an OOM at a single item is raised
    again, mapped through ``at_one`` when given.
    """

    def attempt(start: int, stop: int) -> list[T]:
        try:
            return run(start, stop)
        except Exception as exc:
            if not is_oom(exc):
                raise
            if on_oom is not None:
                on_oom()
            if stop - start <= 1:
                if at_one is not None:
                    raise at_one(exc) from exc
                raise
            mid = (start + stop) // 2
            log.warning("model.oom_split", size=stop - start, into=[mid - start, stop - mid])
            return attempt(start, mid) + attempt(mid, stop)

    return attempt(0, n) if n else []
