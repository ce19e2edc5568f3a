"""Grounding on real photos with the tiny OWLv2 (random weights: boxes are arbitrary, geometry is not)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from models.grounding import GroundingResult, Grounder, clip_box, padded_crop_box
from models.prompts import detection_prompt


@pytest.fixture(scope="module")
def photos(sample_photos: list[tuple[Path, str]]) -> list[tuple[Image.Image, str]]:
    return [(Image.open(p).convert("RGB"), c) for p, c in sample_photos]


@pytest.fixture(scope="module")
def grounder() -> Grounder:
    return Grounder(profile="tiny", device="cpu", threshold=0.0, padding=0.1)


def test_prompts_use_natural_nouns() -> None:
    assert detection_prompt("dress") == "a photo of a dress"
    assert detection_prompt("outwear") == "a photo of a jacket"
    assert detection_prompt("longsleeve") == "a photo of a long-sleeved shirt"
    assert detection_prompt("t-shirt") == "a photo of a t-shirt"


def test_batch_of_mixed_categories_gives_boxes_inside_the_image(grounder: Grounder, photos) -> None:
    images, categories = [im for im, _ in photos], [c for _, c in photos]
    results = grounder.predict(images, categories)
    assert len(results) == len(images)
    grounded = 0
    for image, category, result in zip(images, categories, results):
        assert isinstance(result, GroundingResult)
        assert result.prompt == detection_prompt(category)
        if result.box is not None:
            x0, y0, x1, y1 = result.box
            assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height
        if result.fallback:
            assert result.crop.size == image.size
        else:
            grounded += 1
            assert result.score is not None and result.score > grounder.threshold
            left, top, right, bottom = padded_crop_box(result.box, image.size, grounder.padding)
            assert result.crop.size == (right - left, bottom - top)
            assert result.crop.width <= image.width and result.crop.height <= image.height
    assert grounded > 0, "threshold 0 should accept at least one in-image box"


def test_threshold_one_always_falls_back_to_the_full_image(photos) -> None:
    strict = Grounder(profile="tiny", device="cpu", threshold=1.0)
    images = [im for im, _ in photos[:4]]
    results = strict.predict(images, [c for _, c in photos[:4]])
    for image, result in zip(images, results):
        assert result.fallback
        assert result.crop.size == image.size
        assert list(result.crop.getdata())[:50] == list(image.getdata())[:50]


def test_batch_equals_one_by_one(grounder: Grounder, photos) -> None:
    images, categories = [im for im, _ in photos[:3]], [c for _, c in photos[:3]]
    together = grounder.predict(images, categories)
    alone = [grounder.predict([im], [c])[0] for im, c in zip(images, categories)]
    for a, b in zip(together, alone):
        assert a.fallback == b.fallback
        assert (a.score is None) == (b.score is None)
        if a.score is not None:
            assert a.score == pytest.approx(b.score, abs=1e-4)


def test_box_geometry_helpers() -> None:
    assert clip_box((-10, -5, 50, 500), (100, 200)) == (0.0, 0.0, 50.0, 200.0)
    assert clip_box((80, 90, 20, 10), (100, 100)) == (20.0, 10.0, 80.0, 90.0)
    assert clip_box((150, 150, 300, 300), (100, 100)) is None
    assert padded_crop_box((10, 10, 30, 50), (100, 100), 0.5) == (0, 0, 40, 70)


def test_mismatched_inputs_are_rejected(grounder: Grounder, photos) -> None:
    with pytest.raises(ValueError):
        grounder.predict([photos[0][0]], [])
    assert grounder.predict([], []) == []


def test_owlv2_preprocessing_moves_to_the_gpu_and_means_the_same_there(grounder: Grounder, photos) -> None:
    import torch

    from models.grounding import preprocess_on_device

    grounder.load()
    processor = grounder._processor
    # On a GPU worker the pad-and-resize runs on the device; on the CPU nothing changes.
    assert preprocess_on_device(processor, torch.device("cuda", 0)) == {"device": torch.device("cuda", 0)}
    assert preprocess_on_device(processor, torch.device("cpu")) == {}
    # The keyword reaches the image processor (an unknown one would be refused or ignored with a
    # warning): naming the CPU explicitly gives the very pixels the default path gives.
    images = [im for im, _ in photos[:2]]
    queries = [["a photo of a dress"], ["a photo of a shirt"]]
    plain = processor(text=queries, images=images, return_tensors="pt")
    placed = processor(text=queries, images=images, return_tensors="pt", device=torch.device("cpu"))
    assert torch.equal(plain["pixel_values"], placed["pixel_values"])
