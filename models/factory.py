"""Builds the model stages from configuration: one place decides which class and which weights.

``build_models`` constructs wrappers only; nothing is loaded until a stage is first used, so a
Celery parent process can build the bundle before fork and each child loads its own copy after.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.base import ModelVersionInfo
from models.embeddings import DEFAULT_CLIP, ClipEmbedder
from models.grounding import DEFAULT_DETECTOR, Grounder
from models.verify import AttributeVerifier

PROFILES = ("pretrained", "random-full", "tiny")
DEFAULT_VLM = "HuggingFaceTB/SmolVLM-256M-Instruct"


@dataclass(frozen=True)
class ModelConfig:
    """Everything the model layer needs, passed in (the model layer never reads the environment)."""

    profile: str = "pretrained"
    device: str = "auto"
    detector: str = DEFAULT_DETECTOR
    vlm: str = DEFAULT_VLM
    clip: str = DEFAULT_CLIP
    cache_dir: Path = field(default_factory=lambda: Path("models-cache"))
    s3_endpoint_url: str | None = None
    detection_threshold: float = 0.2
    crop_padding: float = 0.05
    verify_margin: float = 0.05
    max_new_tokens: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"unknown model profile {self.profile!r}: expected one of {', '.join(PROFILES)}")


class ModelBundle:
    """The four model stages of one worker process, each created on first access and loaded on first use."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._grounder: Grounder | None = None
        self._embedder: ClipEmbedder | None = None
        self._verifier: AttributeVerifier | None = None
        self._generator: Any = None
        self._pretrained_versions: dict[str, ModelVersionInfo] | None = None

    def _common(self) -> dict[str, Any]:
        c = self.config
        return {"profile": c.profile, "device": c.device, "cache_dir": c.cache_dir,
                "s3_endpoint_url": c.s3_endpoint_url, "seed": c.seed}

    @property
    def grounder(self) -> Grounder:
        with self._lock:
            if self._grounder is None:
                self._grounder = Grounder(self.config.detector, threshold=self.config.detection_threshold,
                                          padding=self.config.crop_padding, **self._common())
            return self._grounder

    @property
    def embedder(self) -> ClipEmbedder:
        with self._lock:
            if self._embedder is None:
                self._embedder = ClipEmbedder(self.config.clip, **self._common())
            return self._embedder

    @property
    def verifier(self) -> AttributeVerifier:
        embedder = self.embedder  # outside the lock: the property takes it itself
        with self._lock:
            if self._verifier is None:
                self._verifier = AttributeVerifier(embedder, margin=self.config.verify_margin)
            return self._verifier

    @property
    def generator(self) -> Any:
        """The listing VLM (``models.listing.ListingGenerator``), imported here so this module works
        without it and so importing the factory never imports the VLM stack."""
        with self._lock:
            if self._generator is None:
                from models.listing import ListingGenerator

                self._generator = ListingGenerator(self.config)
            return self._generator

    def versions(self) -> dict[str, ModelVersionInfo]:
        """Model versions by kind (detector, clip, vlm when importable); what stored rows record."""
        out = {"detector": self.grounder.version(), "clip": self.embedder.version()}
        try:
            out["vlm"] = self.generator.version()
        except ImportError:
            pass
        if self.config.profile == "pretrained":
            # Fingerprinting weight directories walks them: once per process, not once per listing.
            if self._pretrained_versions is None:
                self._pretrained_versions = {kind: self._pretrained_identity(kind, info) for kind, info in out.items()}
            return dict(self._pretrained_versions)
        return out

    def _pretrained_identity(self, kind: str, info: ModelVersionInfo) -> ModelVersionInfo:
        """Same answer before and after loading, in every process (CPU workers never load)."""
        from dataclasses import replace

        from models.loading import pretrained_revision

        ref = {"detector": self.config.detector, "vlm": self.config.vlm, "clip": self.config.clip}[kind]
        revision = pretrained_revision(ref, cache_dir=self.config.cache_dir,
                                       s3_endpoint_url=self.config.s3_endpoint_url, kind=kind)
        return replace(info, name=ref, revision=revision)


def build_models(config: ModelConfig) -> ModelBundle:
    """A bundle for ``config``; the profile decides how each stage gets its weights (see each wrapper)."""
    return ModelBundle(config)
