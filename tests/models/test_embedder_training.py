"""Contrastive training pieces (loss, masking, batches, training, budget) and the retrieval metrics."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from models import retrieval_eval as re_
from models.embedder_training import (
    ContrastiveConfig,
    TrainingSet,
    category_run_batches,
    contrastive_loss,
    encode_images,
    encode_texts,
    false_negative_mask,
    set_trainable,
    stack_images,
    train_contrastive,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_mask_hides_same_key_pairs_but_never_the_positive() -> None:
    mask = false_negative_mask(["a", "a", "b"])
    assert mask.tolist() == [[False, True, False], [True, False, False], [False, False, False]]


def test_loss_is_open_clips_symmetric_infonce_when_no_key_repeats() -> None:
    from open_clip.loss import ClipLoss

    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    ours = contrastive_loss(img, txt, scale, [str(i) for i in range(6)])
    assert torch.allclose(ours, ClipLoss()(img, txt, scale), atol=1e-6)
    # Items 0 and 1 share a key: masking drops their cross logits, which only ever add to the loss.
    masked = contrastive_loss(img, txt, scale, ["x", "x", "2", "3", "4", "5"])
    assert masked < ours


def test_category_runs_cover_every_item_once_and_group_categories() -> None:
    cats = ["a"] * 10 + ["b"] * 7 + ["c"] * 3
    batches = category_run_batches(cats, batch_size=6, run_length=3, rng=random.Random(0))
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(20))
    changes = sum(cats[a] != cats[b] for a, b in zip(flat, flat[1:]))
    assert changes <= 7  # 8 runs (4 of a, 3 of b, 1 of c) laid end to end: at most 7 category changes


def test_config_rejects_unknown_trainable() -> None:
    with pytest.raises(ValueError, match="trainable"):
        ContrastiveConfig(trainable="lora")


def _tiny():  # noqa: ANN202
    import open_clip

    from models.tiny import register_tiny_open_clip, seeded

    name = register_tiny_open_clip()
    with seeded(0):
        model = open_clip.create_model(name)
    return model, open_clip.get_tokenizer(name)


def _squares(n: int) -> tuple[list[Image.Image], list[str]]:
    """Half red, half blue images with a little noise: two categories any embedder can learn."""
    rng = np.random.default_rng(0)
    images, cats = [], []
    for i in range(n):
        colour = np.array([200, 30, 30] if i % 2 == 0 else [30, 30, 200])
        arr = np.clip(colour + rng.normal(0, 25, (72, 72, 3)), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(arr))
        cats.append("red" if i % 2 == 0 else "blue")
    return images, cats


def test_training_learns_two_categories_and_the_metrics_show_it() -> None:
    model, tokenizer = _tiny()
    images, cats = _squares(32)
    pixels = stack_images(images, 72)
    texts = [f"a photo of a {c}" for c in cats]
    data = TrainingSet(pixels=pixels, texts=texts, categories=cats, negative_keys=cats)
    before = re_.evaluate(encode_images(model, pixels), cats, lambda t: encode_texts(model, tokenizer, t))
    report = train_contrastive(model, tokenizer, data, ContrastiveConfig(epochs=8, batch_size=16, lr=2e-3,
                                                                         warmup_steps=2, run_length=4))
    after = re_.evaluate(encode_images(model, pixels), cats, lambda t: encode_texts(model, tokenizer, t))
    assert report.steps == 16 and report.last_loss < report.first_loss
    assert after["zero_shot_accuracy"] == 1.0 and after["zero_shot_accuracy"] > before["zero_shot_accuracy"] - 1e-9
    assert after["image_to_image"]["hits@1"] == 1.0
    assert not model.token_embedding.weight.requires_grad  # the token table stays fixed by default


def test_budget_stops_training_and_last_blocks_trains_fewer_parameters() -> None:
    model, tokenizer = _tiny()
    images, cats = _squares(8)
    data = TrainingSet(pixels=stack_images(images, 72), texts=cats, categories=cats, negative_keys=cats)
    report = train_contrastive(model, tokenizer, data, ContrastiveConfig(epochs=50, batch_size=4, max_seconds=0.0))
    assert report.stopped_by_budget and report.steps == 0
    every = set_trainable(model, "all", token_embedding=True)
    assert 0 < set_trainable(model, "last-blocks", 1) < every


def test_retrieval_metrics_on_known_vectors() -> None:
    e = np.eye(4, dtype=np.float32)
    vectors = np.stack([e[0], e[0] * 0.9 + e[1] * 0.1, e[1], e[2]])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    labels = ["a", "a", "b", "c"]  # "b" and "c" have no other item: not queries
    i2i = re_.image_to_image(vectors, labels)
    assert i2i == {"hits@1": 1.0, "hits@5": 1.0, "mrr": 1.0, "queries": 2}
    classes = np.stack([e[0], e[1], e[3]])  # "c"'s prompt points away from its image: one miss in four
    assert re_.zero_shot_accuracy(vectors, labels, classes, ["a", "b", "c"]) == 0.75
    relevant = np.array([[True, True, False, False]])
    t2i = re_.text_to_image(e[1:2], relevant, vectors, ks=(1, 2))
    assert t2i["recall@1"] == 0.0 and t2i["recall@2"] == 1.0 and t2i["precision@2"] == 0.5
    attrs = [{"color": "red"}, {"color": "red"}, {"color": "blue"}, {}]
    assert re_.attribute_hits(vectors, labels, attrs, k=1) == pytest.approx(2 / 3)


def test_category_mismatch_fires_only_when_confident_and_never_for_random_weights() -> None:
    e = np.eye(3, dtype=np.float32)
    classes = ["dress", "hat", "shoes"]
    images = np.stack([e[0], e[1], (e[0] + e[2]) / np.sqrt(2)])  # a clear dress, a clear hat, dress-or-shoes
    stated = ["hat", "hat", "dress"]
    checks = re_.category_checks(images, stated, e, classes, temperature=10.0, threshold=0.8)
    assert [c.mismatch for c in checks] == [True, False, False]  # the third is not confident either way
    assert checks[0].predicted == "dress" and checks[0].confidence > 0.99 and checks[0].stated_probability < 0.01
    assert checks[2].confidence == pytest.approx(checks[2].stated_probability)
    assert not any(c.mismatch for c in re_.category_checks(images, stated, e, classes, temperature=10.0,
                                                            random_weights=True))
