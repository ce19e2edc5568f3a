"""Builds the model stages from configuration: one place decides which class and which weights.

``build_models`` constructs wrappers only; nothing is loaded until a stage is first used, so a
Celery parent process can build the bundle before fork and each child loads its own copy after.
"""

from __future__ import annotations

import threading
from typing import Any

from models.base import ModelVersionInfo
from models.config import DEFAULT_CLIP, DEFAULT_DETECTOR, DEFAULT_VLM, PROFILES, ModelConfig
from models.embeddings import ClipEmbedder
from models.grounding import Grounder
from models.verify import AttributeVerifier

class ModelBundle:
    """The four model stages of one worker process, each created on first access and loaded on first use."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._grounder: Grounder | None = None
        self._embedder: ClipEmbedder | None = None
        self._verifier: AttributeVerifier | None = None
        self._generator: Any = None

    def _common(self, kind: str) -> dict[str, Any]:
        c = self.config
        return {"profile": c.profile_of(kind), "device": c.device, "cache_dir": c.cache_dir,
                "s3_endpoint_url": c.s3_endpoint_url, "seed": c.seed}

    @property
    def grounder(self) -> Grounder:
        with self._lock:
            if self._grounder is None:
                self._grounder = Grounder(self.config.detector, threshold=self.config.detection_threshold,
                                          padding=self.config.crop_padding, **self._common("detector"))
            return self._grounder

    @property
    def embedder(self) -> ClipEmbedder:
        with self._lock:
            if self._embedder is None:
                self._embedder = ClipEmbedder(self.config.clip, **self._common("clip"))
            return self._embedder

    @property
    def verifier(self) -> AttributeVerifier:
        embedder = self.embedder  # outside the lock: the property takes it itself
        with self._lock:
            if self._verifier is None:
                self._verifier = AttributeVerifier(embedder, margin=self.config.verify_margin,
                                                   conflict_margin=self.config.conflict_margin)
            return self._verifier

    @property
    def generator(self) -> Any:
        """The listing VLM (``models.listing.ListingGenerator``), imported here so this module works
        without it and so importing the factory never imports the VLM stack."""
        with self._lock:
            if self._generator is None:
                from models.listing import ListingGenerator

                self._generator = ListingGenerator(self.config, profile=self.config.profile_of("vlm"))
            return self._generator

    def versions(self) -> dict[str, ModelVersionInfo]:
        """Model versions by kind (detector, clip, vlm when importable); what stored rows record.

        Each is the wrapper's ``version()``, i.e. ``models.identity.model_identity`` for its ref: the
        same before and after loading and in every process (CPU workers never load), and the same
        the embedding backfill registers. Wrappers compute it once, so this is cheap per listing.
        """
        out = {"detector": self.grounder.version(), "clip": self.embedder.version()}
        try:
            out["vlm"] = self.generator.version()
        except ImportError:
            pass
        return out


def build_models(config: ModelConfig) -> ModelBundle:
    """A bundle for ``config``; the profile decides how each stage gets its weights (see each wrapper)."""
    return ModelBundle(config)
