"""Near-duplicate verification on real photos: copies confirmed, look-alike photos refused."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

from models.dedup import (
    CANDIDATE_K,
    CANDIDATE_MAX_HAMMING,
    DuplicateCandidate,
    DuplicateMatch,
    NearDuplicateVerifier,
)
from models.hashing import ImageHashes, hamming, perceptual_hashes
from models.images import decode_image, load_image_file


def _jpeg(img: Image.Image, quality: int = 90) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return decode_image(buf.getvalue()).image


def crop_8pct(img: Image.Image) -> Image.Image:
    w, h = img.size
    return _jpeg(img.crop((int(w * 0.05), int(h * 0.02), w - int(w * 0.03), h - int(h * 0.06))))


def price_sticker(img: Image.Image) -> Image.Image:
    out = img.copy()
    draw = ImageDraw.Draw(out)
    draw.rectangle((12, 12, 12 + img.width // 4, 12 + img.height // 14), fill=(220, 30, 30))
    draw.text((18, 14), "$19.99", font=ImageFont.load_default(size=img.height // 20), fill="white")
    return _jpeg(out)


def jpeg_q25(img: Image.Image) -> Image.Image:
    return _jpeg(img, quality=25)


def half_size_darker(img: Image.Image) -> Image.Image:
    small = img.resize((img.width // 2, img.height // 2), Image.Resampling.LANCZOS)
    return _jpeg(ImageEnhance.Brightness(small).enhance(0.7))


COPIES = [crop_8pct, price_sticker, jpeg_q25, half_size_darker]


def _candidate_distance(a: ImageHashes, b: ImageHashes) -> int:
    return min(hamming(a.phash, b.phash), hamming(a.dhash, b.dhash))


@pytest.fixture(scope="module")
def verifier() -> NearDuplicateVerifier:
    return NearDuplicateVerifier()


@pytest.fixture(scope="module")
def photos(sample_photos: list[tuple[Path, str]]) -> list[Image.Image]:
    return [load_image_file(path).image for path, _ in sample_photos[::4]]


def _same_photograph(a: Image.Image, b: Image.Image) -> bool:
    """The dataset stores a few photographs twice; such a pair is a real duplicate, not a negative."""
    if a.size != b.size:
        return False
    diff = np.abs(np.asarray(a.convert("L"), np.int16) - np.asarray(b.convert("L"), np.int16))
    return float(diff.mean()) < 2.0


def closest_distinct_pair(dataset_dir: Path, manifest: list[dict], category: str, n: int = 200):
    """The two different photos of ``category`` (first ``n``) whose hashes are nearest."""
    rows = [r for r in manifest if r["category"] == category][:n]
    images = [load_image_file(dataset_dir / r["path"]).image for r in rows]
    hashes = [perceptual_hashes(img) for img in images]
    pairs = sorted(
        (_candidate_distance(hashes[i], hashes[j]), i, j)
        for i in range(len(rows))
        for j in range(i + 1, len(rows))
    )
    for dist, i, j in pairs:
        if not _same_photograph(images[i], images[j]):
            return dist, images[i], images[j]
    raise AssertionError("no distinct pair found")


@pytest.mark.parametrize("make_copy", COPIES, ids=lambda f: f.__name__)
def test_copies_pass_candidate_stage_and_are_confirmed(
    verifier: NearDuplicateVerifier, photos: list[Image.Image], make_copy
) -> None:
    for i, original in enumerate(photos):
        copy = make_copy(original)
        dist = _candidate_distance(perceptual_hashes(copy), perceptual_hashes(original))
        assert dist <= CANDIDATE_MAX_HAMMING
        [match] = verifier.verify(copy, [DuplicateCandidate(image_id=i, image=original, hamming=dist)])
        assert match.confirmed, match
        assert match.inliers >= verifier.min_inliers and match.agreement >= verifier.min_agreement


@pytest.mark.parametrize("category", ["t-shirt", "pants"])
def test_different_photos_with_close_hashes_refused(
    verifier: NearDuplicateVerifier, dataset_dir: Path, manifest: list[dict], category: str
) -> None:
    dist, a, b = closest_distinct_pair(dataset_dir, manifest, category)
    assert dist <= 8, "expected a look-alike pair the hash alone would call a duplicate"
    [match] = verifier.verify(a, [DuplicateCandidate(image_id=7, image=b, hamming=dist)])
    assert not match.confirmed, match
    assert match == DuplicateMatch(7, dist, match.inliers, False, match.agreement)


def test_same_background_pair_passes_geometry_but_fails_photometric_check(
    verifier: NearDuplicateVerifier, dataset_dir: Path
) -> None:
    # A blue and a navy dress on the same hanger in front of the same wardrobe: the background
    # alone yields enough RANSAC inliers, so only the per-cell agreement can refuse it.
    a = load_image_file(dataset_dir / "train/dress/6e143162-9472-43c3-8db1-04eeea838ae8.jpg").image
    b = load_image_file(dataset_dir / "train/dress/6eaff8d0-517f-4fad-ad54-4249b8c53ff9.jpg").image
    dist = _candidate_distance(perceptual_hashes(a), perceptual_hashes(b))
    assert dist <= CANDIDATE_MAX_HAMMING
    [match] = verifier.verify(a, [DuplicateCandidate(1, b, dist)])
    assert match.inliers >= verifier.min_inliers
    assert match.agreement < verifier.min_agreement and not match.confirmed


def test_best_match_picks_the_copy_among_lookalikes(
    verifier: NearDuplicateVerifier, photos: list[Image.Image]
) -> None:
    original, *others = photos
    candidates = [DuplicateCandidate(100 + k, img, hamming=5) for k, img in enumerate(others)]
    candidates.insert(1, DuplicateCandidate(42, original, hamming=12))
    best = verifier.best_match(crop_8pct(original), candidates)
    assert best is not None and best.image_id == 42 and best.confirmed
    assert verifier.best_match(crop_8pct(original), [c for c in candidates if c.image_id != 42]) is None


def test_query_features_computed_once_and_cached_features_reused(
    verifier: NearDuplicateVerifier, photos: list[Image.Image], monkeypatch: pytest.MonkeyPatch
) -> None:
    cached = [DuplicateCandidate(k, None, 3, features=verifier.features(p)) for k, p in enumerate(photos)]
    calls: list[int] = []
    original = NearDuplicateVerifier.features

    def counting(self: NearDuplicateVerifier, img: Image.Image):  # noqa: ANN202
        calls.append(1)
        return original(self, img)

    monkeypatch.setattr(NearDuplicateVerifier, "features", counting)
    matches = verifier.verify(jpeg_q25(photos[0]), cached)
    assert len(calls) == 1
    assert [m.image_id for m in matches] == list(range(len(photos)))
    assert [m.confirmed for m in matches] == [True] + [False] * (len(photos) - 1)


def test_featureless_images_are_never_confirmed(verifier: NearDuplicateVerifier) -> None:
    blank = Image.new("RGB", (400, 533), (255, 255, 255))
    [match] = verifier.verify(blank, [DuplicateCandidate(1, blank.copy(), 0)])
    assert verifier.features(blank).count == 0
    assert match.inliers == 0 and not match.confirmed


def test_candidate_without_image_or_features_is_an_error(
    verifier: NearDuplicateVerifier, photos: list[Image.Image]
) -> None:
    assert verifier.verify(photos[0], []) == []
    with pytest.raises(ValueError):
        verifier.verify(photos[0], [DuplicateCandidate(1, None, 0)])


def test_candidate_constants_are_generous_but_bounded() -> None:
    # Unrelated 64-bit hashes sit ~32 bits apart; the threshold must stay clearly below that.
    assert 16 <= CANDIDATE_MAX_HAMMING < 28
    assert CANDIDATE_K >= 8
