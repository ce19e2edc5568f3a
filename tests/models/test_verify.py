"""Visual verification of generated attributes with the tiny CLIP on real photos.

Random weights make CLIP's preferences arbitrary, so the tests read CLIP's preferred value first and
then check keep/drop decisions against it; margins 0 and 1 force both outcomes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from models.categories import resolve_schema
from models.embeddings import ClipEmbedder
from models.verify import AttributeVerifier, VerifiedListing, attribute_prompt


@pytest.fixture(scope="module")
def embedder() -> ClipEmbedder:
    return ClipEmbedder(profile="tiny", device="cpu")


@pytest.fixture(scope="module")
def dress_photo(sample_photos: list[tuple[Path, str]]) -> Image.Image:
    return next(Image.open(p).convert("RGB") for p, c in sample_photos if c == "dress")


def listing(**attributes: str) -> dict:
    return {"title": "Summer dress with a flared skirt", "description": "A dress photographed on a hanger.",
            "attributes": attributes}


def clip_choice(embedder: ClipEmbedder, photo: Image.Image, attribute: str, value: str) -> str:
    strict = AttributeVerifier(embedder, margin=1.0)
    result = strict.verify([photo], [listing(**{attribute: value})], [resolve_schema("dress")], [{}])[0]
    return result.dropped[attribute]["clip_value"]


def test_margin_zero_keeps_clips_choice_and_margin_one_drops_it(embedder, dress_photo) -> None:
    schema = resolve_schema("dress")
    preferred = clip_choice(embedder, dress_photo, "color", "black")
    other = next(v for v in schema.visual_attributes["color"] if v != preferred)

    lenient = AttributeVerifier(embedder, margin=0.0)
    kept, disagreed = lenient.verify([dress_photo, dress_photo], [listing(color=preferred), listing(color=other)],
                                     [schema, schema], [{}, {}])
    assert kept.content["attributes"]["color"]["value"] == preferred
    assert kept.content["attributes"]["color"]["source"] == "image"
    assert 0.0 < kept.content["attributes"]["color"]["confidence"] <= 1.0
    assert disagreed.dropped["color"] == {"value": other, "reason": "clip_prefers_other", "clip_value": preferred,
                                          "confidence": pytest.approx(disagreed.dropped["color"]["confidence"])}
    assert "color" not in disagreed.content["attributes"]

    strict = AttributeVerifier(embedder, margin=1.0).verify([dress_photo], [listing(color=preferred)], [schema], [{}])[0]
    assert "color" not in strict.content["attributes"]
    assert strict.dropped["color"]["reason"] == "below_margin"


def test_merchant_only_attributes_never_come_from_the_model(embedder, dress_photo) -> None:
    schema = resolve_schema("dress")
    assert {"material", "brand", "size"} <= set(schema.merchant_only_attributes)
    generated = listing(color="red", material="silk", brand="Acme", size="M")
    result = AttributeVerifier(embedder, margin=0.0).verify(
        [dress_photo], [generated], [schema], [{"material": "cotton"}])[0]
    attrs = result.content["attributes"]
    assert attrs["material"] == {"value": "cotton", "confidence": 1.0, "source": "merchant"}
    assert "brand" not in attrs and "size" not in attrs
    assert result.dropped["brand"]["reason"] == "merchant_only"
    assert result.dropped["size"]["reason"] == "merchant_only"
    assert all(a["source"] == "merchant" for name, a in attrs.items() if name in schema.merchant_only_attributes)


def test_merchant_visual_values_win_and_every_kept_attribute_is_attributed(embedder, dress_photo) -> None:
    schema = resolve_schema("dress")
    result = AttributeVerifier(embedder, margin=0.0).verify(
        [dress_photo], [listing(color="blue", pattern="striped", length="midi")], [schema], [{"color": "red"}])[0]
    assert isinstance(result, VerifiedListing)
    assert result.content["attributes"]["color"] == {"value": "red", "confidence": 1.0, "source": "merchant"}
    assert result.content["title"] == "Summer dress with a flared skirt"
    for value in result.content["attributes"].values():
        assert set(value) == {"value", "confidence", "source"}
    assert set(result.content["attributes"]) | set(result.dropped) >= {"color", "pattern", "length"}


def test_values_outside_the_schema_are_dropped(embedder, dress_photo) -> None:
    result = AttributeVerifier(embedder, margin=0.0).verify(
        [dress_photo], [listing(color="chartreuse", wingspan="wide")], [resolve_schema("dress")], [{}])[0]
    assert result.dropped["color"]["reason"] == "not_in_schema"
    assert result.dropped["wingspan"]["reason"] == "not_in_schema"
    assert result.content["attributes"] == {}


def test_prompt_embeddings_are_computed_once_per_attribute(embedder, sample_photos) -> None:
    photos = [Image.open(p).convert("RGB") for p, c in sample_photos if c in {"dress", "shoes"}]
    schemas = [resolve_schema(c) for p, c in sample_photos if c in {"dress", "shoes"}]
    generated = [listing(color="black") for _ in photos]
    verifier = AttributeVerifier(embedder, margin=0.0)
    calls: list[int] = []
    original = embedder.embed_texts

    def counting(texts: list[str]):  # noqa: ANN202
        calls.append(len(texts))
        return original(texts)

    embedder.embed_texts = counting  # type: ignore[method-assign]
    try:
        verifier.verify(photos, generated, schemas, [{}] * len(photos))
        verifier.verify(photos, generated, schemas, [{}] * len(photos))
    finally:
        del embedder.embed_texts
    n_colors = len(resolve_schema("dress").visual_attributes["color"]) + len(resolve_schema("shoes").visual_attributes["color"])
    assert calls == [n_colors], "one text call for the whole batch, none for the repeat"


def test_prompts_read_as_captions() -> None:
    assert attribute_prompt("dress", "color", "navy") == "a photo of a navy dress"
    assert attribute_prompt("dress", "neckline", "v_neck") == "a photo of a dress with a v neck neckline"
    assert attribute_prompt("t-shirt", "sleeve_length", "sleeveless") == "a photo of a sleeveless t-shirt"
    assert attribute_prompt("hat", "brim", "none") == "a photo of a hat without a brim"


def test_mismatched_lengths_are_rejected(embedder) -> None:
    with pytest.raises(ValueError):
        AttributeVerifier(embedder, margin=0.1).verify([], [listing()], [], [])


def test_category_checks_vote_over_every_category_and_random_weights_never_accuse(embedder, sample_photos) -> None:
    from models.categories import CATEGORIES

    verifier = AttributeVerifier(embedder, margin=0.05)
    images = [Image.open(p).convert("RGB") for p, _ in sample_photos[:3]]
    vectors = embedder.embed_images(images)
    checks = verifier.category_checks(vectors, ["dress", "not-a-category", "shoes"])
    assert checks[1] is None  # no schema: nothing to check against
    names = set(CATEGORIES) - {"generic"}
    for check, stated in ((checks[0], "dress"), (checks[2], "shoes")):
        assert check["stated"] == stated and check["predicted"] in names
        assert 0.0 < check["stated_probability"] <= check["probability"] <= 1.0
        # The tiny clip's weights are random: its vote is reported, never turned into an accusation.
        assert check["mismatch"] is False
    # Threshold 0 would flag any disagreement, but random weights still never accuse.
    assert all(c is None or c["mismatch"] is False for c in verifier.category_checks(vectors, ["dress"] * 3, threshold=0.0))
