"""CLIP embeddings (tiny open_clip, 512-d like ViT-B-32) on real photos, and the visual description."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.embeddings import ClipEmbedder, encode_text_to_eot, visual_description


@pytest.fixture(scope="module")
def images(sample_photos: list[tuple[Path, str]]) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p, _ in sample_photos[:6]]


@pytest.fixture(scope="module")
def embedder() -> ClipEmbedder:
    return ClipEmbedder(profile="tiny", device="cpu")


def test_image_vectors_are_512d_unit_float32(embedder: ClipEmbedder, images) -> None:
    vectors = embedder.embed_images(images)
    assert vectors.shape == (len(images), 512) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.dims == 512
    assert embedder.version().dims == 512 and embedder.version().random_weights


def test_batch_equals_one_by_one_and_is_deterministic(embedder: ClipEmbedder, images) -> None:
    batch = embedder.embed_images(images)
    single = np.concatenate([embedder.embed_images([im]) for im in images])
    np.testing.assert_allclose(batch, single, atol=1e-5)
    again = ClipEmbedder(profile="tiny", device="cpu").embed_images(images)
    np.testing.assert_allclose(batch, again, atol=1e-6)
    assert not np.allclose(batch[0], batch[1]), "different photos, different vectors"


def test_predict_returns_one_vector_per_image(embedder: ClipEmbedder, images) -> None:
    rows = embedder.predict(images[:2])
    assert len(rows) == 2 and rows[0].shape == (512,)


def test_text_vectors(embedder: ClipEmbedder) -> None:
    texts = ["a photo of a red dress", "a photo of a blue hat", "a photo of a red dress"]
    vectors = embedder.embed_texts(texts)
    assert vectors.shape == (3, 512)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors[0], vectors[2], atol=1e-6)
    np.testing.assert_allclose(embedder.embed_texts(texts[1:2])[0], vectors[1], atol=1e-5)
    assert embedder.embed_texts([]).shape == (0, 512)


def test_text_encoding_stops_at_the_last_end_of_text_token_and_agrees_with_open_clip(embedder: ClipEmbedder) -> None:
    import torch

    embedder.load()
    model, tokenizer = embedder._model, embedder._tokenizer  # noqa: SLF001
    short = ["a red dress", visual_description("shirt", {"color": "navy blue", "sleeve_length": "long"}), ""]
    long = " ".join(["striped"] * 120)  # truncated by the tokenizer: its end-of-text token is the 77th
    calls: list[int] = []
    hook = model.transformer.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[1]))
    try:
        with torch.inference_mode():
            for texts in (short, [*short, long]):
                tokens = tokenizer(texts)
                np.testing.assert_allclose(encode_text_to_eot(model, tokens).numpy(),
                                           model.encode_text(tokens).numpy(), atol=1e-5)
    finally:
        hook.remove()
    # the short batch ran only as far as its longest text; the batch with a full-length text needed all 77
    assert calls[0] == int(tokenizer(short).argmax(dim=-1).max()) + 1 < 77
    assert calls[2] == 77


def test_visual_description_is_visual_short_and_deterministic() -> None:
    attrs = {"color": "navy", "pattern": "polka_dot", "sleeve_length": "three_quarter", "neckline": "v_neck",
             "length": "midi", "fit": "a_line"}
    text = visual_description("dress", attrs)
    assert text == visual_description("dress", dict(reversed(attrs.items())))
    assert 10 <= len(text.split()) <= 20
    assert "navy" in text and "polka dot" in text and "dress" in text and "_" not in text
    minimal = visual_description("outwear", {"color": "black", "pattern": "solid"})
    assert 10 <= len(minimal.split()) <= 20 and "black jacket" in minimal and "solid" not in minimal
    long_values = {f"attribute_{i}": "very_long_value_name" for i in range(12)}
    assert len(visual_description("shoes", long_values).split()) <= 20


def test_a_saved_clip_loads_back_as_the_same_model_with_its_provenance(tmp_path) -> None:  # noqa: ANN001
    import numpy as np
    from PIL import Image

    from models.embeddings import ClipEmbedder, save_clip

    tiny = ClipEmbedder("tiny", profile="tiny", device="cpu", seed=7)
    directory = save_clip(tiny, tmp_path / "clip", random_weights=True, base=tiny.version().canonical)
    back = ClipEmbedder(str(directory), profile="pretrained", device="cpu")
    image = Image.new("RGB", (80, 80), (200, 10, 10))
    assert np.allclose(tiny.embed_images([image]), back.embed_images([image]))
    version = back.version()
    assert version.random_weights and version.dims == 512 and version.revision.startswith("sha256-")
    other = ClipEmbedder("tiny", profile="tiny", device="cpu", seed=0)
    assert not np.allclose(other.embed_images([image]), back.embed_images([image]))  # another seed, other weights
