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

from tasks.pipeline.policy import PolicyTable

if TYPE_CHECKING:  # heavy imports only for type checkers
    from models.dedup import NearDuplicateVerifier
    from models.config import ModelConfig
    from models.factory import ModelBundle
    from models.images import ImageLimits
    from models.batch import MicroBatcher
    from tasks.faults import FaultPlan
    from tasks.io.fetcher import ImageFetcher
    from tasks.feedback.pairs import RetrainConfig
    from tasks.io.blobs import BlobStore
    from tasks.pipeline.serving import ModelServer


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
    models_factory: Callable[[ModelConfig], ModelBundle]  # builds (never loads) a bundle: GPU workers only
    model_config: ModelConfig | None = None  # this worker's configured models (first deployment, pins)
    pinned_models: frozenset[str] = frozenset()  # kinds served from model_config instead of the registry
    registry_poll_s: float = 30.0  # how often a GPU worker re-reads the active versions
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    unknown_category: str = "generic"
    max_images: int = 4  # photos of a product the model stage grounds and embeds (the primary first)
    enriched_event_version: int = 2  # listing.enriched contract version published (1 for old consumers)
    enrichment: PolicyTable = field(default_factory=PolicyTable)  # which stages run (ENRICH_ENRICHMENT__*)
    batch_size: int = 8
    batch_max_wait_ms: int = 200
    feature_cache: LruCache = field(default_factory=lambda: LruCache(4096))
    # "name@revision" of model versions by id, for the events persist publishes: a version's name and
    # revision never change (models register by them; a re-registration updates params and metrics only).
    model_names: LruCache = field(default_factory=lambda: LruCache(256))
    _server: ModelServer | None = field(default=None, init=False, repr=False)
    _verifier: NearDuplicateVerifier | None = field(default=None, init=False, repr=False)
    _batcher: MicroBatcher | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    datasets: BlobStore | None = None  # where DPO datasets are written (retrain)
    retrain: RetrainConfig | None = None
    faults: FaultPlan | None = None  # test-only fault injection (tasks.faults); None in production
    # Liveness (README "Reliability and security"): a running stage beats its claim every heartbeat_s;
    # the reconciler calls a claimed stage stalled after stall_after_s without a beat, an unclaimed
    # (queued) one after queued_stall_after_s. A model task waits model_wait_s at most for its batch
    # (the soft time limit: the threads pool enforces no Celery limit); a batch running batch_hang_s
    # (the hard limit) is hung, and on_batcher_hung ends the process so its supervisor restarts it.
    heartbeat_s: float = 60.0
    stall_after_s: float = 360.0
    queued_stall_after_s: float = 86400.0
    model_wait_s: float | None = None
    batch_hang_s: float | None = None
    on_batcher_hung: Callable[[], None] | None = None

    @property
    def dedup_verifier(self) -> NearDuplicateVerifier:
        with self._lock:
            if self._verifier is None:
                from models.dedup import NearDuplicateVerifier

                self._verifier = NearDuplicateVerifier()
            return self._verifier

    def _server_unlocked(self) -> ModelServer:
        """What this GPU worker serves (``tasks.pipeline.serving``); the caller holds ``_lock``."""
        if self._server is None:
            from models.config import ModelConfig
            from tasks.pipeline.serving import ModelServer

            self._server = ModelServer(self.session_factory, self.model_config or ModelConfig(),
                                       self.models_factory, pinned=self.pinned_models, poll_s=self.registry_poll_s)
        return self._server

    @property
    def batcher(self) -> MicroBatcher:
        """The in-process micro-batcher of the GPU stage (one model thread per process)."""
        with self._lock:
            if self._batcher is None:
                from models.batch import MicroBatcher

                plan = self.faults

                def fault_point(items: list[Any]) -> None:  # tasks.faults' "model.batch" point
                    if plan is not None and plan.active:
                        plan.apply("model.batch", {"size": len(items), "job_ids": [i.job_id for i in items]})

                from tasks import metrics

                server = self._server_unlocked()
                self._batcher = MicroBatcher(lambda items: server.run_batch(items, before=fault_point),
                                             max_size=self.batch_size, max_wait_ms=self.batch_max_wait_ms,
                                             hang_after_s=self.batch_hang_s, on_hang=self.on_batcher_hung,
                                             prepare=metrics.timed_loads(server), on_batch=metrics.batch_ran)
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
