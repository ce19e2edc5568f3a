"""Near-duplicate verification on real photos: copies confirmed, look-alike photos refused."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

from models.dedup import (
    CANDIDATE_K,
    CANDIDATE_MAX_HAMMING,
    DuplicateCandidate,
    DuplicateMatch,
    NearDuplicateVerifier,
    nearest_two,
)
from models.dedup_io import features_from_bytes, features_to_bytes
from models.hashing import ImageHashes, candidate_distances, candidate_hashes, hamming, perceptual_hashes
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


def letterboxed(img: Image.Image) -> Image.Image:
    side = max(img.size)
    canvas = Image.new("RGB", (side, side), (30, 60, 140))
    canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return _jpeg(canvas)


def mirrored(img: Image.Image) -> Image.Image:
    return _jpeg(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT))


def turned_4deg(img: Image.Image) -> Image.Image:
    return _jpeg(img.rotate(4, resample=Image.Resampling.BICUBIC, expand=True, fillcolor="white"))


def mirrored_and_boxed(img: Image.Image) -> Image.Image:
    return letterboxed(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT))


COPIES = [crop_8pct, price_sticker, jpeg_q25, half_size_darker, letterboxed, mirrored, turned_4deg,
          mirrored_and_boxed]


def _candidate_distance(a: ImageHashes, b: ImageHashes) -> int:
    return min(hamming(a.phash, b.phash), hamming(a.dhash, b.dhash))


def _search_distance(query: Image.Image, stored: Image.Image) -> int:
    """The distance candidate search measures (plain, trimmed and mirrored comparisons)."""
    s = candidate_hashes(stored)
    return min(candidate_distances(candidate_hashes(query), s.plain, s.trimmed))


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
        dist = _search_distance(copy, original)
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
    assert match == DuplicateMatch(7, dist, match.inliers, False, match.agreement, match.central)


def test_same_background_pair_passes_geometry_but_fails_photometric_check(
    verifier: NearDuplicateVerifier, dataset_dir: Path
) -> None:
    # Two different pairs of jeans laid on the same white sheet on the same carpet: the sheet's
    # folds and the carpet yield enough RANSAC inliers, so only the per-cell agreement can refuse
    # it (the worst central cell, on the garment, is far below what a copy reaches).
    a = load_image_file(dataset_dir / "validation/pants/19ff0603-c52b-4d27-a9b9-cfd9da5e9f35.jpg").image
    b = load_image_file(dataset_dir / "validation/pants/dde58bb3-f90a-4830-84e1-6d27fe3c16bc.jpg").image
    dist = _candidate_distance(perceptual_hashes(a), perceptual_hashes(b))
    assert dist <= CANDIDATE_MAX_HAMMING
    [match] = verifier.verify(a, [DuplicateCandidate(1, b, dist)])
    assert match.inliers >= verifier.min_inliers
    assert match.central < verifier.min_central_agreement and not match.confirmed


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


def _transplant(base: Image.Image, donor: Image.Image, fraction: float) -> Image.Image:
    """``base`` with a centred rectangle of ``fraction`` of its area taken from ``donor`` (another
    garment), re-encoded: everything around it agrees pixel for pixel."""
    w, h = base.size
    side = fraction ** 0.5
    box = (round(w * (1 - side) / 2), round(h * (1 - side) / 2), round(w * (1 + side) / 2), round(h * (1 + side) / 2))
    out = base.copy()
    out.paste(donor.resize(base.size, Image.Resampling.LANCZOS).crop(box), box[:2])
    return _jpeg(out)


@pytest.mark.parametrize("fraction", [0.12, 0.2, 0.3])
def test_a_garment_sized_disagreement_is_refused_however_much_background_agrees(
    verifier: NearDuplicateVerifier, photos: list[Image.Image], fraction: float
) -> None:
    """Up to 88% of the picture is the same pixels: the background, the shared composition. A
    different garment in the middle (a hat-sized 12% to a shirt-sized 30%) is still no copy."""
    refused = 0
    for i, base in enumerate(photos):
        donor = photos[(i + 3) % len(photos)]
        [match] = verifier.verify(_transplant(base, donor, fraction), [DuplicateCandidate(i, base, 0)])
        assert not match.confirmed, (i, match)
        refused += match.inliers >= verifier.min_inliers  # geometry alone would have accepted these
    assert refused >= len(photos) // 2, "the check must be exercised on pairs the geometry accepts"


def test_swapping_query_and_candidate_never_changes_the_decision(
    verifier: NearDuplicateVerifier, sample_photos: list[tuple[Path, str]], dataset_dir: Path, manifest: list[dict]
) -> None:
    """Over copies (every kind above), look-alikes (closest hashes in a category, the same
    background) and unrelated photos: the decision and its evidence are the same either way round."""
    originals = [load_image_file(path).image for path, _ in sample_photos]
    pairs = [(make_copy(img), img) for img in originals[::3] for make_copy in COPIES]
    pairs += [(a, _transplant(a, b, 0.2)) for a, b in zip(originals, originals[1:])]
    for category in ("t-shirt", "pants", "shirt", "dress"):
        _, a, b = closest_distinct_pair(dataset_dir, manifest, category, n=80)
        pairs.append((a, b))
    pairs += [(a, b) for a, b in zip(originals[::2], originals[1::2])]
    decisions = set()
    for x, y in pairs:
        fx, fy = verifier.features(x), verifier.features(y)
        forward = verifier.match_features(fx, fy, image_id=1, hamming=5)
        backward = verifier.match_features(fy, fx, image_id=1, hamming=5)
        assert forward == backward, (forward, backward)
        decisions.add(forward.confirmed)
    assert len(pairs) >= 60 and decisions == {True, False}


def test_mirrored_copies_are_confirmed_through_the_mirror(
    verifier: NearDuplicateVerifier, photos: list[Image.Image]
) -> None:
    through_mirror = 0
    for i, original in enumerate(photos):
        [plain] = verifier.verify(jpeg_q25(original), [DuplicateCandidate(i, original, 0)])
        [flipped] = verifier.verify(mirrored(original), [DuplicateCandidate(i, original, 0)])
        assert plain.confirmed and not plain.mirrored
        assert flipped.confirmed
        through_mirror += flipped.mirrored  # a garment laid out symmetrically may match either way
    assert through_mirror >= len(photos) - 1


def test_turns_beyond_a_re_upload_are_refused(verifier: NearDuplicateVerifier, photos: list[Image.Image]) -> None:
    for i, original in enumerate(photos):
        turned = _jpeg(original.rotate(25, resample=Image.Resampling.BICUBIC, expand=True, fillcolor="white"))
        [match] = verifier.verify(turned, [DuplicateCandidate(i, original, 0)])
        assert not match.confirmed


def _garment_mask(img: Image.Image) -> np.ndarray:
    """Soft garment mask (0..1, image size): GrabCut from a centred rectangle, holes filled, as a
    seller's background tool would find the garment."""
    small = img.copy()
    small.thumbnail((240, 240))
    bgr = cv2.cvtColor(np.asarray(small), cv2.COLOR_RGB2BGR)
    h, w = bgr.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    cv2.grabCut(bgr, mask, (int(w * 0.06), int(h * 0.06), int(w * 0.88), int(h * 0.88)), np.zeros((1, 65)),
                np.zeros((1, 65)), 5, cv2.GC_INIT_WITH_RECT)
    fg = np.isin(mask, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.uint8) * 255
    contours, _ = cv2.findContours(fg, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(fg)
    cv2.drawContours(filled, contours, -1, 255, thickness=cv2.FILLED)
    return cv2.GaussianBlur(cv2.resize(filled.astype(np.float32) / 255, img.size), (0, 0), 2)


def _dark_backdrop(img: Image.Image) -> Image.Image:
    """The background around the garment re-coloured dark grey, its shading kept; the garment untouched."""
    soft = _garment_mask(img)[..., None]
    rgb = np.asarray(img).astype(np.float32)
    grey = rgb.mean(axis=2, keepdims=True)
    shade = np.clip(grey / max(float(np.percentile(grey[soft[..., 0] < 0.5], 90)), 1.0), 0, 1.25)
    out = rgb * soft + shade * np.array((64, 64, 64), np.float32) * (1 - soft)
    return _jpeg(Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)))


@pytest.mark.parametrize("photo", ["validation/dress/a65dc730-f117-4a1a-8fe9-917fad90a167.jpg",
                                   "validation/pants/7eb1dd4c-e663-468d-b8ec-fb2d277ad499.jpg",
                                   "validation/dress/974964a0-77cc-47b3-a54f-57eea90bb3fe.jpg"])
def test_a_background_changed_around_the_garment_is_confirmed(
    verifier: NearDuplicateVerifier, dataset_dir: Path, photo: str
) -> None:
    """A light floor turned dark grey around an unchanged garment: the garment's outline loses or
    flips its contrast, which pulls a central cell below ``min_central_agreement`` (the copy
    used to be refused there); what disagrees is a contour, not an area, so it is a copy."""
    original = load_image_file(dataset_dir / photo).image
    copy = _dark_backdrop(original)
    [match] = verifier.verify(copy, [DuplicateCandidate(1, original, 0)])
    assert match.confirmed, match
    assert match.central < verifier.min_central_agreement  # confirmed by the outline rule, not the plain one
    strict = NearDuplicateVerifier(max_central_solid=-1.0)  # the central rule without the outline excuse
    [refused] = strict.verify(copy, [DuplicateCandidate(1, original, 0)])
    assert not refused.confirmed


def _pasted_garment(base: Image.Image, donor: Image.Image, scale: float = 0.8) -> Image.Image:
    """``base`` with ``donor``'s garment (cut out by its mask, scaled) laid over its middle."""
    w, h = base.size
    pasted = donor.resize((int(w * scale), int(h * scale)), Image.Resampling.LANCZOS)
    mask = _garment_mask(pasted)[..., None]
    out = np.asarray(base).astype(np.float32).copy()
    x, y = (w - pasted.width) // 2, (h - pasted.height) // 2
    region = out[y:y + pasted.height, x:x + pasted.width]
    region[:] = region * (1 - mask) + np.asarray(pasted).astype(np.float32) * mask
    return _jpeg(Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)))


@pytest.mark.parametrize("recoloured", [False, True], ids=["same_background", "background_changed_too"])
def test_another_garment_laid_over_the_photo_is_refused(
    verifier: NearDuplicateVerifier, photos: list[Image.Image], recoloured: bool
) -> None:
    """The garment-shaped counterpart of the transplant test: the same background everywhere around
    another garment (and, harder, that background re-coloured as well, so its outline and the
    background disagree as in a true background-changed copy). Never a copy."""
    geometric = 0
    for i, base in enumerate(photos):
        query = _pasted_garment(base, photos[(i + 2) % len(photos)])
        if recoloured:
            query = _dark_backdrop(query)
        [match] = verifier.verify(query, [DuplicateCandidate(i, base, 0)])
        assert not match.confirmed, (i, match)
        geometric += match.inliers >= verifier.min_inliers
    assert geometric >= len(photos) // 2, "the check must be exercised on pairs the geometry accepts"


def test_persisted_features_are_exactly_the_extracted_ones(
    verifier: NearDuplicateVerifier, photos: list[Image.Image]
) -> None:
    """What the fetch stage writes beside an original reads back bit for bit, so a decision is the
    same whether a candidate's features were just extracted or read from storage; anything else
    is a ValueError (the caller then extracts them again)."""
    original = photos[0]
    extracted = verifier.features(original)
    data = features_to_bytes(extracted)
    stored = features_from_bytes(data)
    for a, b in ((extracted, stored), (extracted.mirrored, stored.mirrored)):
        assert a is not None and b is not None
        assert np.array_equal(a.points, b.points) and np.array_equal(a.descriptors, b.descriptors)
        assert np.array_equal(a.thumb, b.thumb) and (a.work_shape, a.key) == (b.work_shape, b.key)
    query = verifier.features(mirrored(original))
    assert (verifier.match_features(query, stored, image_id=1, hamming=3)
            == verifier.match_features(query, extracted, image_id=1, hamming=3))
    blank = verifier.features(Image.new("RGB", (64, 64), "white"))
    assert features_from_bytes(features_to_bytes(blank)).count == 0
    for bad in (b"", b"not an npz", data[: len(data) // 2]):
        with pytest.raises(ValueError):
            features_from_bytes(bad)
    buf = io.BytesIO()
    np.savez(buf, format=np.array([999], np.int32))
    with pytest.raises(ValueError, match="format"):
        features_from_bytes(buf.getvalue())


class CountingMatcher:
    """The verifier's real nearest-two search, counting the query descriptors it matches."""

    def __init__(self) -> None:
        self.rows = 0

    def __call__(self, query, train):  # noqa: ANN001, ANN204
        self.rows += len(query)
        return nearest_two(query, train)


def test_the_probe_keeps_every_decision_and_skips_full_matching_of_unrelated_photos(
        photos: list[Image.Image], dataset_dir: Path, manifest: list[dict]) -> None:
    probing, full = NearDuplicateVerifier(), NearDuplicateVerifier(probe_stride=0)
    assert probing.probe_stride > 1
    _, a, b = closest_distinct_pair(dataset_dir, manifest, "shoes")
    pairs = [(make(img), img) for img in photos[:3] for make in (crop_8pct, mirrored, turned_4deg)]
    pairs += [(a, b), (photos[0], photos[1]), (photos[2], photos[3])]
    for query, stored in pairs:
        q, s = probing.features(query), probing.features(stored)
        with_probe = probing.match_features(q, s, image_id=1, hamming=0)
        without = full.match_features(q, s, image_id=1, hamming=0)
        assert with_probe.confirmed == without.confirmed
        if without.confirmed:
            assert (with_probe.inliers, with_probe.agreement, with_probe.mirrored) == \
                (without.inliers, without.agreement, without.mirrored)
    # an unrelated pair: two probes of a quarter of the keypoints, no full matching in either orientation
    counting = CountingMatcher()
    probing._nearest = counting  # noqa: SLF001
    q, s = probing.features(photos[0]), probing.features(photos[1])
    assert not probing.match_features(q, s, image_id=1, hamming=0).confirmed
    first = q if q.key <= s.key else s
    assert counting.rows == len(first.descriptors[::4]) + len(first.mirrored.descriptors[::4])


def test_the_nearest_two_search_keeps_the_brute_force_matchers_ratio_test_matches(photos: list[Image.Image]) -> None:
    """On real photos (each against every other, mirrored and probed too), the ratio-test matches
    taken from ``nearest_two``'s arrays are the ones OpenCV's brute-force ``knnMatch`` gives, pair for
    pair and in the same order: the verifier's fits see the same points."""
    import cv2

    verifier, matcher = NearDuplicateVerifier(), cv2.BFMatcher(cv2.NORM_HAMMING)
    features = [verifier.features(img) for img in photos[:6]]
    views = [v for f in features for v in (f, f.mirrored) if v is not None]
    compared = 0
    for query in views:
        for train in views:
            for stride in (1, verifier.probe_stride):
                q = query.descriptors[::stride]
                expected = [(m[0].queryIdx, m[0].trainIdx) for m in matcher.knnMatch(q, train.descriptors, k=2)
                            if len(m) == 2 and m[0].distance < verifier.ratio_test * m[1].distance]
                dist, nearest = nearest_two(q, train.descriptors)
                good = np.flatnonzero(dist[:, 0] < verifier.ratio_test * dist[:, 1])
                assert [(int(i), int(nearest[i, 0])) for i in good] == expected
                compared += 1
    assert compared >= 2 * 6 * 6 * 2


def test_the_contrast_stretch_maps_every_pixel_as_the_per_pixel_arithmetic_does(photos: list[Image.Image]) -> None:
    """The lookup-table stretch gives the bytes of mapping each pixel in floating point (what ORB then
    sees), on real photos, on a washed-out copy and on a nearly flat image (returned as it is)."""
    from models.dedup import _stretch_contrast, _working_gray

    def per_pixel(gray: np.ndarray) -> np.ndarray:
        lo, hi = np.percentile(gray, (1, 99))
        if hi - lo < 1:
            return gray
        return np.clip((gray.astype(np.float32) - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)

    grays = [_working_gray(img) for img in photos[:6]]
    grays += [(g // 4 + 150).astype(np.uint8) for g in grays[:2]]  # low contrast: a strong stretch
    grays.append(np.full((40, 60), 128, np.uint8))
    for gray in grays:
        stretched = _stretch_contrast(gray)
        assert stretched.dtype == np.uint8 and np.array_equal(stretched, per_pixel(gray))
    assert not np.array_equal(_stretch_contrast(grays[6]), grays[6])  # the low-contrast copy was stretched
