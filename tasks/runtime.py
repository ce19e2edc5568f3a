"""What a task needs from its process, installed once by the worker at start-up.

Tasks never import ``workers``; the worker builds a ``Runtime`` from settings and installs it
here (after fork), and tasks read it with ``get_runtime()``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:  # heavy imports only for type checkers
    from models.dedup import NearDuplicateVerifier
    from models.factory import ModelBundle
    from models.images import ImageLimits
    from models.batch import MicroBatcher
    from tasks.faults import FaultPlan
    from tasks.io.fetcher import ImageFetcher
    from tasks.feedback.pairs import RetrainConfig
    from tasks.io.blobs import BlobStore


class LruCache:
    """A small thread-safe LRU map (e.g. ORB features of stored images, by image id)."""

    def __init__(self, max_items: int) -> None:
        from collections import OrderedDict

        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._max = max_items
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            return None

    def put(self, key: Any, value: Any) -> Any:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._max:
                self._items.popitem(last=False)
        return value


class EventPublisher(Protocol):
    def publish(self, routing_key: str, payload: dict[str, Any], *, message_id: str) -> None:
        """Publish one domain event and return once the broker confirmed it."""


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 5
    backoff_s: float = 2.0
    backoff_max_s: float = 300.0
    max_stage_attempts: int = 12  # retries + redeliveries of one stage before it is given up


@dataclass
class Runtime:
    session_factory: sessionmaker[Session]
    blobs: BlobStore
    fetcher: ImageFetcher
    publisher: EventPublisher
    image_limits: ImageLimits
    models_factory: Callable[[], ModelBundle]
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    unknown_category: str = "generic"
    batch_size: int = 8
    batch_max_wait_ms: int = 200
    feature_cache: LruCache = field(default_factory=lambda: LruCache(4096))
    _models: ModelBundle | None = field(default=None, init=False, repr=False)
    _verifier: NearDuplicateVerifier | None = field(default=None, init=False, repr=False)
    _model_ids: dict[str, int] | None = field(default=None, init=False, repr=False)
    _batcher: MicroBatcher | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    datasets: BlobStore | None = None  # where DPO datasets are written (retrain)
    retrain: RetrainConfig | None = None
    faults: FaultPlan | None = None  # test-only fault injection (tasks.faults); None in production

    @property
    def models(self) -> ModelBundle:
        """The model bundle; weights load lazily on first predict, in this (forked) process."""
        with self._lock:
            if self._models is None:
                self._models = self.models_factory()
            return self._models

    @property
    def model_ids(self) -> dict[str, int]:
        """Row ids of the configured model versions (registered on first use in this process)."""
        with self._lock:
            if self._model_ids is None:
                from db.repositories.model_versions import ensure_model_versions

                if self._models is None:
                    self._models = self.models_factory()
                with self.session_factory() as session, session.begin():
                    self._model_ids = ensure_model_versions(session, self._models.versions())
            return self._model_ids

    @property
    def random_weights(self) -> bool:
        return any(v.random_weights for v in self.models.versions().values())

    @property
    def dedup_verifier(self) -> NearDuplicateVerifier:
        with self._lock:
            if self._verifier is None:
                from models.dedup import NearDuplicateVerifier

                self._verifier = NearDuplicateVerifier()
            return self._verifier

    @property
    def batcher(self) -> MicroBatcher:
        """The in-process micro-batcher of the GPU stage (one model thread per process)."""
        with self._lock:
            if self._batcher is None:
                from models.batch import MicroBatcher, run_model_batch

                plan = self.faults

                def fault_point(items: list[Any]) -> None:  # tasks.faults' "model.batch" point
                    if plan is not None and plan.active:
                        plan.apply("model.batch", {"size": len(items), "job_ids": [i.job_id for i in items]})

                models = self._models or self.models_factory()
                self._models = models
                self._batcher = MicroBatcher(lambda items: run_model_batch(models, items, before=fault_point),
                                             max_size=self.batch_size, max_wait_ms=self.batch_max_wait_ms)
            return self._batcher


_runtime: Runtime | None = None


def install_runtime(runtime: Runtime | None) -> None:
    global _runtime
    if _runtime is not None and _runtime._batcher is not None:
        _runtime._batcher.close()
    _runtime = runtime


def get_runtime() -> Runtime:
    if _runtime is None:
        raise RuntimeError("no task runtime installed in this process (workers.wiring.install_from_settings)")
    return _runtime
