"""Weights from a local directory, from s3:// (moto server), and the errors when they are missing."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.devices import autocast_dtype, select_device
from models.embeddings import ClipEmbedder
from models.errors import ModelError, WeightsMissing
from models.grounding import Grounder
from models.loading import resolve_model_ref, s3_cache_dir, weights_status
from models.tiny import build_random_owlv2, register_tiny_open_clip, seeded, tiny_open_clip_config, tiny_owlv2_config


@pytest.fixture(scope="module")
def owl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny OWLv2 saved the way a real checkpoint is: save_pretrained of model and processor."""
    target = tmp_path_factory.mktemp("owl-tiny")
    model, processor = build_random_owlv2(tiny_owlv2_config(), seed=0)
    model.save_pretrained(target)
    processor.save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny open_clip model in open_clip's local-dir layout (config json + weights file)."""
    import open_clip

    target = tmp_path_factory.mktemp("clip-tiny")
    with seeded(0):
        model = open_clip.create_model(register_tiny_open_clip(), pretrained=None)
    torch.save(model.state_dict(), target / "open_clip_pytorch_model.bin")
    (target / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_open_clip_config()}))
    return target


@pytest.fixture(scope="module")
def photos(sample_photos: list[tuple[Path, str]]) -> list[tuple[Image.Image, str]]:
    return [(Image.open(p).convert("RGB"), c) for p, c in sample_photos[:3]]


def test_grounder_loads_from_local_directory(owl_dir: Path, photos, tmp_path: Path) -> None:
    grounder = Grounder(str(owl_dir), profile="pretrained", device="cpu", cache_dir=tmp_path)
    results = grounder.predict([im for im, _ in photos], [c for _, c in photos])
    assert len(results) == len(photos)
    version = grounder.version()
    assert version.revision.startswith("sha256-") and version.profile == "pretrained"


def test_clip_loads_from_local_directory_with_the_saved_weights(clip_dir: Path, photos, tmp_path: Path) -> None:
    from_dir = ClipEmbedder(str(clip_dir), profile="pretrained", device="cpu", cache_dir=tmp_path)
    built = ClipEmbedder(profile="tiny", device="cpu", seed=0)
    images = [im for im, _ in photos]
    np.testing.assert_allclose(from_dir.embed_images(images), built.embed_images(images), atol=1e-5)
    assert from_dir.dims == 512


@pytest.fixture(scope="module")
def s3(owl_dir: Path, clip_dir: Path) -> Iterator[tuple[str, object]]:
    """A moto S3 server on a free local port holding both saved models."""
    import boto3
    from moto.server import ThreadedMotoServer

    mp = pytest.MonkeyPatch()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        mp.setenv(key, value)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="models")
    for prefix, directory in (("detectors/owl-tiny", owl_dir), ("clip/tiny", clip_dir)):
        for file in directory.iterdir():
            client.upload_file(str(file), "models", f"{prefix}/{file.name}")
    try:
        yield endpoint, client
    finally:
        server.stop()
        mp.undo()


def test_s3_prefix_is_downloaded_once_and_loads(s3, photos, tmp_path: Path) -> None:
    endpoint, client = s3
    uri = "s3://models/detectors/owl-tiny"
    local = resolve_model_ref(uri, cache_dir=tmp_path, s3_endpoint_url=endpoint)
    assert Path(local) == s3_cache_dir(uri, tmp_path)
    assert (Path(local) / "config.json").is_file() and (Path(local) / "model.safetensors").is_file()
    assert weights_status(uri, profile="pretrained", cache_dir=tmp_path)[0]

    # The mirror is reused: it resolves even with the endpoint gone.
    assert resolve_model_ref(uri, cache_dir=tmp_path, s3_endpoint_url="http://127.0.0.1:9") == local

    grounder = Grounder(uri, profile="pretrained", device="cpu", cache_dir=tmp_path, s3_endpoint_url=endpoint)
    assert len(grounder.predict([photos[0][0]], [photos[0][1]])) == 1
    embedder = ClipEmbedder("s3://models/clip/tiny", profile="pretrained", device="cpu", cache_dir=tmp_path,
                            s3_endpoint_url=endpoint)
    assert embedder.embed_texts(["a photo of a dress"]).shape == (1, 512)


def test_empty_s3_prefix_is_weights_missing(s3, tmp_path: Path) -> None:
    endpoint, _ = s3
    with pytest.raises(WeightsMissing, match="ENRICH_MODELS__VLM"):
        resolve_model_ref("s3://models/nothing-here", cache_dir=tmp_path, s3_endpoint_url=endpoint, kind="vlm")
    assert not list((tmp_path / "s3").glob("*")), "a failed download leaves nothing in the cache"


@pytest.mark.parametrize(
    ("wrapper", "setting"),
    [
        (lambda d: Grounder("google/owlv2-base-patch16-ensemble", device="cpu", cache_dir=d), "ENRICH_MODELS__DETECTOR"),
        (lambda d: ClipEmbedder("ViT-B-32/laion2b_s34b_b79k", device="cpu", cache_dir=d), "ENRICH_MODELS__CLIP"),
        (lambda d: Grounder("/nonexistent/owl", device="cpu", cache_dir=d), "ENRICH_MODELS__DETECTOR"),
        (lambda d: ClipEmbedder("./no/such/clip", device="cpu", cache_dir=d), "ENRICH_MODELS__CLIP"),
    ],
)
def test_missing_weights_name_the_setting(wrapper, setting: str, tmp_path: Path) -> None:
    model = wrapper(tmp_path)
    with pytest.raises(WeightsMissing) as info:
        model.load()
    message = str(info.value)
    assert setting in message and "s3://" in message and "tiny" in message
    assert not model.loaded


def test_weights_status_is_truthful(owl_dir: Path, clip_dir: Path, tmp_path: Path) -> None:
    assert weights_status("google/owlv2-base-patch16-ensemble", profile="tiny", cache_dir=tmp_path)[0]
    assert weights_status("anything", profile="random-full", cache_dir=tmp_path)[0]
    assert not weights_status("google/owlv2-base-patch16-ensemble", profile="pretrained", cache_dir=tmp_path)[0]
    assert not weights_status("ViT-B-32/laion2b_s34b_b79k", profile="pretrained", cache_dir=tmp_path)[0]
    assert weights_status(str(owl_dir), profile="pretrained", cache_dir=tmp_path)[0]
    assert weights_status(str(clip_dir), profile="pretrained", cache_dir=tmp_path)[0]
    assert not weights_status(str(tmp_path / "absent"), profile="pretrained", cache_dir=tmp_path)[0]


def test_device_selection() -> None:
    assert select_device("cpu") == torch.device("cpu")
    assert autocast_dtype(torch.device("cpu")) is None
    with pytest.raises(ModelError, match="unknown device"):
        select_device("tpu")
    if not torch.cuda.is_available():
        assert select_device("auto") == torch.device("cpu")
        with pytest.raises(ModelError, match="CUDA is not available"):
            select_device("cuda:0")
