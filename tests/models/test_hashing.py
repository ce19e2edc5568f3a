"""Content and perceptual hashes on real photos."""

from __future__ import annotations

import io
from pathlib import Path

import imagehash
import pytest

from models.hashing import ImageHashes, hamming, perceptual_hashes, sha256_hex
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
