"""The factory: lazy stages, version labels, one thread-safe load per process, nothing at import."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from models.factory import ModelConfig, build_models


def test_building_loads_nothing(tmp_path: Path) -> None:
    bundle = build_models(ModelConfig(profile="tiny", device="cpu", cache_dir=tmp_path))
    assert not bundle.grounder.loaded and not bundle.embedder.loaded
    assert bundle.verifier.embedder is bundle.embedder
    assert bundle.grounder is bundle.grounder


def test_versions_label_random_weights(tmp_path: Path) -> None:
    bundle = build_models(ModelConfig(profile="tiny", device="cpu", cache_dir=tmp_path, seed=3))
    versions = bundle.versions()
    assert versions["detector"].random_weights and versions["detector"].revision == "random-seed3"
    assert versions["clip"].dims == 512 and versions["clip"].profile == "tiny"
    full = build_models(ModelConfig(profile="random-full", device="cpu", cache_dir=tmp_path))
    assert full.embedder.version().name == "ViT-B-32" and full.embedder.version().random_weights
    assert full.grounder.version().name == "google/owlv2-base-patch16-ensemble"
    assert not full.grounder.loaded


def test_unknown_profile_is_rejected() -> None:
    with pytest.raises(ValueError, match="profile"):
        ModelConfig(profile="huge")


def test_load_is_idempotent_and_thread_safe(tmp_path: Path) -> None:
    embedder = build_models(ModelConfig(profile="tiny", device="cpu", cache_dir=tmp_path)).embedder
    calls: list[int] = []
    original = embedder._load
    gate = threading.Barrier(6)

    def counting_load() -> None:
        calls.append(1)
        original()

    embedder._load = counting_load  # type: ignore[method-assign]
    shapes: list[tuple[int, ...]] = []

    def worker() -> None:
        gate.wait()
        shapes.append(embedder.embed_texts(["a photo of a hat"]).shape)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    embedder.load()
    assert calls == [1] and shapes == [(1, 512)] * 6 and embedder.loaded


def test_importing_the_model_layer_loads_no_model() -> None:
    code = (
        "import sys, models.factory, models.grounding, models.embeddings, models.verify, models.loading\n"
        "assert 'open_clip' not in sys.modules, 'open_clip imported at import time'\n"
        "from models.factory import ModelConfig, build_models\n"
        "b = build_models(ModelConfig(profile='tiny', device='cpu'))\n"
        "assert not b.grounder.loaded and not b.embedder.loaded\n"
    )
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_generator_comes_from_the_same_config_and_loads_lazily(tmp_path: Path) -> None:
    pytest.importorskip("models.listing")
    bundle = build_models(ModelConfig(profile="tiny", device="cpu", cache_dir=tmp_path, seed=2))
    generator = bundle.generator
    assert generator is bundle.generator and not generator.loaded
    vlm = bundle.versions()["vlm"]
    assert vlm.random_weights and vlm.revision == "random-seed2" and not generator.loaded


def test_pretrained_versions_are_known_without_loading(tmp_path) -> None:  # noqa: ANN001
    """CPU workers record versions without loading weights: same identity before and after a load."""
    from models.factory import ModelConfig, build_models
    from models.grounding import Grounder
    from models.vlm_builders import build_tiny_vlm, save_vlm

    det_dir, vlm_dir = tmp_path / "det", tmp_path / "vlm"
    tiny_det = Grounder(profile="tiny", cache_dir=tmp_path)
    tiny_det.load()
    tiny_det._model.save_pretrained(det_dir)
    tiny_det._processor.save_pretrained(det_dir)
    model, processor = build_tiny_vlm(seed=0)
    save_vlm(model, processor, vlm_dir, random_weights=True, base="tiny@random-seed0")
    config = ModelConfig(profile="pretrained", device="cpu", detector=str(det_dir), vlm=str(vlm_dir),
                         clip="ViT-B-32/laion2b_s34b_b79k", cache_dir=tmp_path / "cache")
    bundle = build_models(config)
    before = bundle.versions()
    assert not bundle.grounder.loaded and not bundle.generator.loaded
    assert before["detector"].revision.startswith("sha256-") and before["vlm"].revision.startswith("sha256-")
    assert before["clip"].revision == "tag-laion2b_s34b_b79k" and not before["detector"].random_weights
    assert before["vlm"].random_weights  # its provenance file says so; the detector dir has none
    assert build_models(config).versions() == before  # another process computes the same identity
    bundle.grounder.load()
    assert bundle.versions() == before
