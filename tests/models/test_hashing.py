"""Content and perceptual hashes on real photos."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import imagehash
import numpy as np
import pytest
from PIL import Image

from models.dedup import CANDIDATE_MAX_HAMMING
from models.hashing import (
    ImageHashes,
    candidate_distances,
    candidate_hashes,
    centre_box,
    hamming,
    perceptual_hashes,
    sha256_hex,
    trim_box,
)
from models.images import decode_image, load_image_file


def test_sha256_matches_manifest(sample_photos: list[tuple[Path, str]], manifest: list[dict]) -> None:
    expected = {r["path"]: r["sha256"] for r in manifest}
    for path, _ in sample_photos:
        rel = path.relative_to(path.parents[2]).as_posix()
        assert sha256_hex(path.read_bytes()) == expected[rel]


def test_hashes_are_64_bit_strings_for_postgres(sample_photos: list[tuple[Path, str]]) -> None:
    for path, _ in sample_photos:
        hashes = perceptual_hashes(load_image_file(path).image)
        for bits in (hashes.phash, hashes.dhash):
            assert len(bits) == 64
            assert set(bits) <= {"0", "1"}


def test_bit_order_matches_imagehash_hex(sample_photos: list[tuple[Path, str]]) -> None:
    img = load_image_file(sample_photos[0][0]).image
    hashes = perceptual_hashes(img)
    assert int(hashes.phash, 2) == int(str(imagehash.phash(img)), 16)
    assert int(hashes.dhash, 2) == int(str(imagehash.dhash(img)), 16)


def test_identical_images_distance_zero_distinct_photos_not(sample_photos: list[tuple[Path, str]]) -> None:
    first = load_image_file(sample_photos[0][0]).image
    again = perceptual_hashes(load_image_file(sample_photos[0][0]).image)
    assert hamming(perceptual_hashes(first).phash, again.phash) == 0
    assert hamming(perceptual_hashes(first).dhash, again.dhash) == 0
    other = perceptual_hashes(load_image_file(sample_photos[-1][0]).image)
    assert hamming(again.phash, other.phash) > 0


def test_lossless_reencode_keeps_hash(sample_photos: list[tuple[Path, str]]) -> None:
    img = load_image_file(sample_photos[1][0]).image
    buf = io.BytesIO()
    img.save(buf, "PNG")
    assert perceptual_hashes(decode_image(buf.getvalue()).image) == perceptual_hashes(img)


def test_hamming_counts_bits() -> None:
    zeros, ones = "0" * 64, "1" * 64
    assert hamming(zeros, ones) == 64
    assert hamming(zeros, "1" + "0" * 63) == 1
    assert hamming(ones, "01" * 32) == hamming("01" * 32, ones) == 32


@pytest.mark.parametrize("bad", ["0" * 63, "0" * 65, "2" * 64, "0x" + "0" * 62])
def test_malformed_bit_strings_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        hamming(bad, "0" * 64)
    with pytest.raises(ValueError):
        ImageHashes(phash=bad, dhash="0" * 64)


def _letterbox(img: Image.Image, fill: tuple[int, int, int], offset: str = "centre") -> Image.Image:
    side = max(img.size)
    canvas = Image.new("RGB", (side, side), fill)
    x = (side - img.width) // 2 if offset == "centre" else side - img.width
    y = (side - img.height) // 2 if offset == "centre" else 0
    canvas.paste(img, (x, y))
    buf = io.BytesIO()
    canvas.save(buf, "JPEG", quality=90)
    return decode_image(buf.getvalue()).image


@pytest.mark.parametrize("fill, offset", [((255, 255, 255), "centre"), ((200, 30, 40), "centre"), ((0, 0, 0), "side")])
def test_trimming_removes_a_letterbox_of_any_colour(sample_photos: list[tuple[Path, str]], fill, offset) -> None:  # noqa: ANN001
    for path, _ in sample_photos[::4]:
        img = load_image_file(path).image
        boxed = _letterbox(img, fill, offset)
        left, top, right, bottom = trim_box(boxed)
        # Within a JPEG block of the pasted photo (ringing at the seam stays out of the border).
        assert abs((right - left) - img.width) <= 8 and abs((bottom - top) - img.height) <= 8, (path, trim_box(boxed))
        assert candidate_hashes(boxed).trimmed != candidate_hashes(boxed).plain


def _reference_hashes(img: Image.Image) -> tuple[ImageHashes, ...]:
    """Each form's hashes straight from imagehash on the colour form (no shared greyscale, no shared
    resampling): what ``candidate_hashes`` must give bit for bit."""
    box = trim_box(img)
    trimmed = img.crop(box)

    def of(form: Image.Image) -> ImageHashes:
        return ImageHashes(phash="".join("1" if b else "0" for b in imagehash.phash(form).hash.ravel()),
                           dhash="".join("1" if b else "0" for b in imagehash.dhash(form).hash.ravel()))

    return (of(img), of(trimmed), of(trimmed.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
            of(trimmed.crop(centre_box(trimmed.size))))


def test_candidate_hashes_are_each_forms_own_hashes_bit_for_bit(sample_photos: list[tuple[Path, str]]) -> None:
    """The shared greyscale and the mirror taken from the resampled images change no bit, on plain
    photos and on letterboxed ones of odd and even widths (the mirror's resampling boundary)."""
    forms = []
    for path, _ in sample_photos:
        img = load_image_file(path).image
        forms += [img, _letterbox(img, (0, 0, 0), "side"), img.crop((3, 0, img.width - 4, img.height))]
    assert any(f.width % 2 for f in forms) and any(f.width % 2 == 0 for f in forms)
    for form in forms:
        h = candidate_hashes(form)
        assert (h.plain, h.trimmed, h.mirrored, h.centre) == _reference_hashes(form)


def test_a_photo_without_border_trims_to_itself(sample_photos: list[tuple[Path, str]]) -> None:
    for path, _ in sample_photos:
        img = load_image_file(path).image
        hashes = candidate_hashes(img)
        if trim_box(img) == (0, 0, *img.size):
            assert hashes.trimmed == hashes.plain == perceptual_hashes(img)
    flat = Image.new("RGB", (300, 400), (250, 250, 250))
    assert trim_box(flat) == (0, 0, 300, 400)  # nothing left to keep: not trimmed at all


def test_letterboxed_and_mirrored_copies_come_near_by_the_candidate_rule(sample_photos: list[tuple[Path, str]]) -> None:
    far_plain = 0
    for path, _ in sample_photos:
        img = load_image_file(path).image
        stored = candidate_hashes(img)
        for copy in (_letterbox(img, (255, 255, 255)), _letterbox(img, (30, 60, 140), "side"),
                     img.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
                     _letterbox(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), (0, 0, 0))):
            query = candidate_hashes(copy)
            assert min(candidate_distances(query, stored.plain, stored.trimmed)) <= 6, path
            # And the other way round: the copy stored, the original searched.
            assert min(candidate_distances(stored, query.plain, query.trimmed)) <= 6, path
            far_plain += min(hamming(query.plain.phash, stored.plain.phash),
                             hamming(query.plain.dhash, stored.plain.dhash)) > 22
    assert far_plain >= len(sample_photos), "the plain hashes alone would miss many of these copies"
    # A row stored before the trimmed hashes existed is compared by its plain ones.
    img = load_image_file(sample_photos[0][0]).image
    assert candidate_distances(candidate_hashes(img), perceptual_hashes(img), None) == (0, 0)


def _recolour_background(img: Image.Image, colour: tuple[int, int, int]) -> Image.Image:
    """The backdrop (pixels within 40 grey levels of the border's median colour) re-coloured to
    ``colour`` with its shading kept, the garment untouched; JPEG re-encoded."""
    rgb = np.asarray(img.convert("RGB")).astype(np.float32)
    edge = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    ref = np.median(edge, axis=0)
    backdrop = np.abs(rgb - ref).max(axis=2) <= 40
    luma = np.array([0.299, 0.587, 0.114], np.float32)
    shade = np.clip((rgb @ luma) / max(float(ref @ luma), 1.0), 0.0, 1.25)[..., None]
    out = np.where(backdrop[..., None], shade * np.array(colour, np.float32), rgb)
    buf = io.BytesIO()
    Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return decode_image(buf.getvalue()).image


def test_centre_box_keeps_the_middle_half_of_each_side() -> None:
    assert centre_box((400, 300)) == (100, 75, 300, 225)
    assert centre_box((1, 1)) == (0, 0, 1, 1)  # never empty


def test_a_copy_on_a_dark_backdrop_is_a_candidate_through_the_centre_hashes(
        sample_photos: list[tuple[Path, str]]) -> None:
    far_without_centre = 0
    for path, _ in sample_photos:
        img = load_image_file(path).image
        stored = candidate_hashes(img)
        copy = candidate_hashes(_recolour_background(img, (64, 64, 64)))
        assert min(candidate_distances(copy, stored.plain, stored.trimmed, stored.centre)) <= CANDIDATE_MAX_HAMMING, path
        assert min(candidate_distances(stored, copy.plain, copy.trimmed, copy.centre)) <= CANDIDATE_MAX_HAMMING, path
        # The rule without the centre comparison (centre against centre becomes plain against plain).
        without = dataclasses.replace(copy, centre=copy.plain)
        far = min(candidate_distances(without, stored.plain, stored.trimmed))
        far_without_centre += far > CANDIDATE_MAX_HAMMING
    assert far_without_centre >= 2, "plain, trimmed and mirrored hashes alone miss some of these copies"
    # A row stored before the centre hashes existed is compared by its plain ones.
    img = load_image_file(sample_photos[0][0]).image
    assert candidate_distances(candidate_hashes(img), perceptual_hashes(img), None, None) == (0, 0)
