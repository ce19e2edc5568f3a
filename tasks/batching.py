"""Micro-batching across products for the GPU stage.

Each Celery task (one per product, on a thread pool with prefetch 1 per slot) submits its item
and waits; a single model thread collects up to ``max_size`` items or waits ``max_wait_ms`` for
the batch to fill, runs the batch function once, and hands each caller its own result. One
item's failure is that item's result, never the batch's.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

import structlog

In = TypeVar("In")
Out = TypeVar("Out")

log = structlog.get_logger(__name__)


class MicroBatcher(Generic[In, Out]):
    def __init__(self, run_batch: Callable[[list[In]], Sequence[Out]], *, max_size: int, max_wait_ms: int) -> None:
        self._run_batch = run_batch
        self._max_size = max(1, max_size)
        self._max_wait = max(0, max_wait_ms) / 1000
        self._queue: queue.Queue[tuple[In, Future[Out]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="micro-batcher", daemon=True)
        self._closed = False
        self.batches_run = 0
        self.items_run = 0
        self._thread.start()

    def submit(self, item: In) -> Future[Out]:
        if self._closed:
            raise RuntimeError("batcher closed")
        fut: Future[Out] = Future()
        self._queue.put((item, fut))
        return fut

    def run(self, item: In, timeout: float | None = None) -> Out:
        return self.submit(item).result(timeout=timeout)

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)

    def _collect(self) -> list[tuple[In, Future[Out]]] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self._max_wait
        while len(batch) < self._max_size:
            remaining = deadline - time.monotonic()
            try:
                nxt = self._queue.get(timeout=max(0.0, remaining)) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                self._queue.put(None)
                break
            batch.append(nxt)
        return batch

    def _loop(self) -> None:
        while (batch := self._collect()) is not None:
            items = [item for item, _ in batch]
            started = time.perf_counter()
            try:
                results = list(self._run_batch(items))
                if len(results) != len(items):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
            except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
                for _, fut in batch:
                    fut.set_exception(exc)
                continue
            self.batches_run += 1
            self.items_run += len(items)
            log.info("batch.done", size=len(items), took_ms=round((time.perf_counter() - started) * 1000, 1))
            for (_, fut), result in zip(batch, results, strict=True):
                fut.set_result(result)
