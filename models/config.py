"""The model layer's configuration, importable without the model stack (settings wiring builds it
in processes that never load torch; only ``models.factory`` turns it into loaded models)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from platformdirs import user_cache_dir

PROFILES = ("pretrained", "random-full", "tiny")
DEFAULT_DETECTOR = "google/owlv2-base-patch16-ensemble"
DEFAULT_VLM = "HuggingFaceTB/SmolVLM-256M-Instruct"
DEFAULT_CLIP = "ViT-B-32/laion2b_s34b_b79k"
# Workers always pass <data_dir>/models; the default keeps library use out of the working directory.
DEFAULT_CACHE_DIR = Path(user_cache_dir("catalog-enrich")) / "models"


@dataclass(frozen=True)
class ModelConfig:
    """Everything the model layer needs, passed in (the model layer never reads the environment)."""

    profile: str = "pretrained"
    device: str = "auto"
    detector: str = DEFAULT_DETECTOR
    vlm: str = DEFAULT_VLM
    clip: str = DEFAULT_CLIP
    cache_dir: Path = DEFAULT_CACHE_DIR
    s3_endpoint_url: str | None = None
    detection_threshold: float = 0.2
    crop_padding: float = 0.05
    verify_margin: float = 0.05
    conflict_margin: float = 0.5
    max_new_tokens: int = 1024
    grammar_threads: int = 0  # threads of models.constrained.MaskFiller; 0: see mask_fill_threads
    grammar_overlap: bool = True  # masks filled during the forward pass (models.constrained.MaskLookahead)
    seed: int = 0
    # Per-kind exceptions to ``profile``: a registry version names its own (e.g. a candidate tuned
    # from the tiny VLM is loaded from its directory, profile "pretrained", beside tiny detectors).
    kind_profiles: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for profile in (self.profile, *(p for _, p in self.kind_profiles)):
            if profile not in PROFILES:
                raise ValueError(f"unknown model profile {profile!r}: expected one of {', '.join(PROFILES)}")

    def profile_of(self, kind: str) -> str:
        return dict(self.kind_profiles).get(kind, self.profile)

    def ref_of(self, kind: str) -> str:
        return {"detector": self.detector, "vlm": self.vlm, "clip": self.clip}[kind]


def mask_fill_threads(configured: int) -> int:
    """The mask filler's thread count: ``configured``, or with 0 every core this process may use."""
    if configured:
        return configured
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
