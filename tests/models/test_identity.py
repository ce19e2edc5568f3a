"""One identity per model: the same from every path, from the weights' bytes, labelled by the weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from models import identity
from models.embeddings import ClipEmbedder
from models.errors import ModelError, WeightsMissing
from models.factory import ModelConfig, build_models
from models.grounding import Grounder
from models.identity import (
    DIGEST_CACHE_FILE,
    PROVENANCE_FILE,
    clear_digest_memo,
    directory_revision,
    model_identity,
    read_provenance,
    write_provenance,
)
from models.tiny import TINY_CLIP_ARCH, build_random_owlv2, register_tiny_open_clip, seeded, tiny_owlv2_config


@pytest.fixture(scope="module")
def owl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A detector directory saved without a provenance file (as any checkpoint from elsewhere)."""
    target = tmp_path_factory.mktemp("owl")
    model, processor = build_random_owlv2(tiny_owlv2_config(), seed=0)
    model.save_pretrained(target)
    processor.save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny (random) VLM saved the way training saves a candidate."""
    from models.vlm_builders import build_tiny_vlm, save_vlm

    base = model_identity("vlm", "unused", profile="tiny")
    model, processor = build_tiny_vlm(seed=0)
    target = tmp_path_factory.mktemp("vlm") / "candidate"
    return save_vlm(model, processor, target, random_weights=base.random_weights, base=base.canonical,
                    produced_by="tests", extra={"dataset": "none"})


@pytest.fixture
def tiny_clip_tag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An open_clip ``ARCH/tag`` that loads offline: the tiny architecture with a registered tag."""
    import open_clip
    from open_clip import pretrained

    with seeded(0):
        model = open_clip.create_model(register_tiny_open_clip(), pretrained=None)
    weights = tmp_path / "tiny-clip.pt"
    torch.save(model.state_dict(), weights)
    tags = {"test_tag": pretrained._pcfg(file=str(weights))}  # noqa: SLF001
    monkeypatch.setitem(pretrained._PRETRAINED, TINY_CLIP_ARCH, tags)  # noqa: SLF001
    return f"{TINY_CLIP_ARCH}/test_tag"


def _hash_counter(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = identity._hash_files

    def counting(files):  # noqa: ANN001, ANN202
        calls.append(len(files))
        return original(files)

    monkeypatch.setattr(identity, "_hash_files", counting)
    return calls


def _layout(directory: Path, weights: bytes) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "owlv2", "hidden_size": 32}))
    (directory / "model.safetensors").write_bytes(weights)
    return directory


def test_backfill_and_workers_register_one_clip_identity(tiny_clip_tag: str, owl_dir: Path, vlm_dir: Path,
                                                         tmp_path: Path) -> None:
    # The backfill (workers/cli/embeddings.py) loads a ClipEmbedder and registers its version().
    backfill = ClipEmbedder(tiny_clip_tag, profile="pretrained", device="cpu", cache_dir=tmp_path)
    backfill.load()
    registered_by_backfill = backfill.version()
    # Workers register ModelBundle.versions() without loading anything.
    config = ModelConfig(profile="pretrained", device="cpu", detector=str(owl_dir), vlm=str(vlm_dir),
                         clip=tiny_clip_tag, cache_dir=tmp_path)
    bundle = build_models(config)
    registered_by_worker = bundle.versions()["clip"]
    assert not bundle.embedder.loaded
    assert registered_by_worker == registered_by_backfill
    assert registered_by_worker.revision == "tag-test_tag" and registered_by_worker.name == tiny_clip_tag
    assert registered_by_worker.dims == 512 and not registered_by_worker.random_weights
    expected = model_identity("clip", tiny_clip_tag, profile="pretrained", cache_dir=tmp_path)
    assert registered_by_worker.canonical == expected.canonical == f"{tiny_clip_tag}@tag-test_tag"
    assert backfill.embed_texts(["a red dress"]).shape == (1, 512)  # the tag really loaded weights


def test_same_names_sizes_and_configs_but_different_bytes_are_different_weights(tmp_path: Path) -> None:
    a = _layout(tmp_path / "a", b"\x01" * 4096)
    b = _layout(tmp_path / "b", b"\x02" * 4096)
    copy_of_a = _layout(tmp_path / "c", b"\x01" * 4096)
    assert directory_revision(a) != directory_revision(b)
    ids = [model_identity("detector", str(d), profile="pretrained", cache_dir=tmp_path / "cache")
           for d in (a, b, copy_of_a)]
    assert ids[0].revision != ids[1].revision
    assert ids[0].revision == ids[2].revision, "same bytes elsewhere: same weights"
    assert ids[0].revision.startswith("sha256-") and len(ids[0].revision) == len("sha256-") + 16
    assert directory_revision(a) == ids[0].revision  # the old name is the content hash now


def test_digest_is_computed_once_and_recomputed_when_a_file_changes(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    clear_digest_memo()
    calls = _hash_counter(monkeypatch)
    weights_dir, cache = _layout(tmp_path / "w", b"\x01" * 4096), tmp_path / "cache"
    first = directory_revision(weights_dir, cache_dir=cache)
    assert directory_revision(weights_dir, cache_dir=cache) == first and len(calls) == 1
    assert Grounder(str(weights_dir), profile="pretrained", cache_dir=cache).version().revision == first
    assert len(calls) == 1, "wrappers share the process cache"

    clear_digest_memo()  # as a second process on the host: the persisted digest answers
    assert directory_revision(weights_dir, cache_dir=cache) == first and len(calls) == 1
    assert (cache / DIGEST_CACHE_FILE).is_file()
    clear_digest_memo()
    assert directory_revision(weights_dir, cache_dir=tmp_path / "other-cache") == first and len(calls) == 2

    weights = weights_dir / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert directory_revision(weights_dir, cache_dir=cache) == first and len(calls) == 3, "a new mtime rehashes"
    weights.write_bytes(b"\x03" * 4096)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000))
    changed = directory_revision(weights_dir, cache_dir=cache)
    assert changed != first and len(calls) == 4
    weights.write_bytes(b"\x03" * 4097)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000))  # same mtime, new size
    assert directory_revision(weights_dir, cache_dir=cache) not in {first, changed} and len(calls) == 5


def test_saved_tiny_vlm_is_random_weights_under_the_pretrained_profile(vlm_dir: Path, owl_dir: Path,
                                                                       tmp_path: Path) -> None:
    from models.listing import ListingGenerator

    generator = ListingGenerator(profile="pretrained", vlm=str(vlm_dir), device="cpu", cache_dir=tmp_path)
    version = generator.version()
    assert version.random_weights and version.profile == "pretrained" and not generator.loaded
    assert version.name == str(vlm_dir) and version.revision.startswith("sha256-")
    config = ModelConfig(profile="pretrained", device="cpu", detector=str(owl_dir), vlm=str(vlm_dir),
                         clip="ViT-B-32/laion2b_s34b_b79k", cache_dir=tmp_path)
    assert build_models(config).versions()["vlm"] == version
    record = read_provenance(vlm_dir)
    assert record is not None and record["base"] == "HuggingFaceTB/SmolVLM-256M-Instruct:tiny@random-seed0"
    assert record["produced_by"] == "tests" and record["dataset"] == "none"


def test_a_directory_without_provenance_is_real_weights(owl_dir: Path, tmp_path: Path) -> None:
    assert read_provenance(owl_dir) is None
    found = model_identity("detector", str(owl_dir), profile="pretrained", cache_dir=tmp_path)
    assert not found.random_weights and found.revision.startswith("sha256-")
    assert not Grounder(str(owl_dir), profile="pretrained", cache_dir=tmp_path).version().random_weights
    assert Grounder(str(owl_dir), profile="tiny", cache_dir=tmp_path).version().random_weights


def test_provenance_and_markers_are_not_part_of_the_weights(tmp_path: Path) -> None:
    weights_dir = _layout(tmp_path / "w", b"\x01" * 64)
    before = directory_revision(weights_dir)
    write_provenance(weights_dir, random_weights=True, base="x@random-seed0", produced_by="tests")
    (weights_dir / ".download-complete").write_text("s3://bucket/w\n")
    (weights_dir / ".cache" / "huggingface").mkdir(parents=True)
    (weights_dir / ".cache" / "huggingface" / "model.safetensors.metadata").write_text("etag 123")
    assert directory_revision(weights_dir) == before
    assert model_identity("vlm", str(weights_dir), profile="pretrained").random_weights


def test_provenance_is_checked(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        write_provenance(tmp_path, random_weights=None, base="b", produced_by="p")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="random_weights"):
        write_provenance(tmp_path, random_weights=False, base="b", produced_by="p",
                         extra={"random_weights": True})
    (tmp_path / PROVENANCE_FILE).write_text("{not json")
    with pytest.raises(ModelError, match="provenance"):
        read_provenance(tmp_path)
    (tmp_path / PROVENANCE_FILE).write_text(json.dumps({"random_weights": "no"}))
    with pytest.raises(ModelError, match="random_weights"):
        model_identity("detector", str(tmp_path), profile="pretrained")


def test_hub_ids_are_snapshot_commits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    for repo, marker in (("org/vlm", "config.json"), ("org/clip", "open_clip_config.json")):
        repo_dir = tmp_path / f"models--{repo.replace('/', '--')}"
        (repo_dir / "snapshots" / commit).mkdir(parents=True)
        (repo_dir / "snapshots" / commit / marker).write_text("{}")
        (repo_dir / "refs").mkdir()
        (repo_dir / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    vlm = model_identity("vlm", "org/vlm", profile="pretrained")
    assert vlm.revision == "hub-0123456789ab" and vlm.canonical == "org/vlm@hub-0123456789ab"
    assert not vlm.random_weights
    assert model_identity("clip", "hf-hub:org/clip", profile="pretrained").revision == "hub-0123456789ab"
    with pytest.raises(WeightsMissing, match="ENRICH_MODELS__DETECTOR"):
        model_identity("detector", "org/absent", profile="pretrained")
    with pytest.raises(WeightsMissing, match="ARCH/pretrained-tag"):
        model_identity("clip", "ViT-B-32", profile="pretrained")


@pytest.mark.parametrize(("kind", "ref", "profile", "name"), [
    ("detector", "google/owlv2-base-patch16-ensemble", "tiny", "owlv2-tiny"),
    ("detector", "google/owlv2-base-patch16-ensemble", "random-full", "google/owlv2-base-patch16-ensemble"),
    ("clip", "ViT-B-32/laion2b_s34b_b79k", "tiny", TINY_CLIP_ARCH),
    ("clip", "ViT-B-32/laion2b_s34b_b79k", "random-full", "ViT-B-32"),
    ("clip", "s3://bucket/clip", "random-full", "ViT-B-32"),
    ("vlm", "HuggingFaceTB/SmolVLM-256M-Instruct", "tiny", "HuggingFaceTB/SmolVLM-256M-Instruct:tiny"),
])
def test_random_profiles_are_random_weights(kind: str, ref: str, profile: str, name: str) -> None:
    got = model_identity(kind, ref, profile=profile, seed=4)
    assert (got.name, got.revision, got.random_weights) == (name, "random-seed4", True)
