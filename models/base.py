"""Model lifecycle: an idempotent, lock-protected ``load()`` and a ``predict()`` that loads first.

Loading happens on first use in the worker process (after fork), never at import time.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass(frozen=True)
class ModelVersionInfo:
    """What a stored row records about the model that produced it."""

    kind: str  # detector | vlm | clip
    name: str  # architecture / hub id, e.g. "ViT-B-32" or "google/owlv2-base-patch16-ensemble"
    revision: str  # tag-<tag> / hub-<commit> / sha256-<content hash> / random-seed<N> (models.identity)
    profile: str  # pretrained | random-full | tiny
    random_weights: bool
    dims: int | None = None

    @property
    def canonical(self) -> str:
        """``name@revision``, as ``models.identity.ModelIdentity.canonical``."""
        return f"{self.name}@{self.revision}"

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.canonical}"


class ModelWrapper(ABC, Generic[In, Out]):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded = False

    @property
    def loaded(self) -> bool:
        return self._loaded

    def load(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if not self._loaded:
                self._load()
                self._loaded = True

    def predict(self, batch: list[In], **kwargs: Any) -> list[Out]:
        self.load()
        if not batch:
            return []
        return self._predict(batch, **kwargs)

    @abstractmethod
    def _load(self) -> None: ...

    @abstractmethod
    def _predict(self, batch: list[In], **kwargs: Any) -> list[Out]: ...

    @abstractmethod
    def version(self) -> ModelVersionInfo: ...
