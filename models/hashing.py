"""Content and perceptual hashes of images.

SHA-256 of the raw bytes is the exact-duplicate key (images are content-addressed). The perceptual
hashes only *propose* near-duplicate candidates: they are stored as Postgres ``bit(64)`` and searched
with Hamming distance, so they are rendered as 64-character '0'/'1' strings, the text form that
``bit(64)`` accepts and returns.

Two re-uploads move a plain hash far: letterboxing to a square (the content shrinks and shifts:
16-29 bits on the clothing photos) and a left-right mirror (22-34 bits). So each image also gets
the hashes of its *trimmed* form (uniform borders cut, ``trim_box``), stored beside the plain ones,
and a query is compared three ways (``CandidateHashes``, ``candidate_distances``): plain against
plain, trimmed against trimmed, and its mirrored trimmed form against trimmed. A photo without a
border trims to itself, so for it the trimmed hashes are the plain ones.

A re-coloured background (a seller's backdrop tool) moves both hashes of the whole picture too: a
dark backdrop past the candidate cut-off for about one copy in ten. The garment sits in the middle,
so each image also gets the *centre* hashes (``centre_box``: the central half of each side of the
trimmed form, a quarter of its area, mostly garment), compared centre against centre as a fourth
comparison.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image

HASH_BITS = 64
_HASH_SIZE = 8  # imagehash side length: 8x8 = 64 bits


def sha256_hex(data: bytes) -> str:
    """Lower-case hex SHA-256 of the bytes as fetched (before decoding)."""
    return hashlib.sha256(data).hexdigest()


def _bits(h: imagehash.ImageHash) -> str:
    return "".join("1" if b else "0" for b in np.asarray(h.hash, dtype=bool).ravel())


def _check_bits(value: str) -> None:
    if len(value) != HASH_BITS or value.strip("01"):
        raise ValueError("expected a 64-character string of '0'/'1'")


@dataclass(frozen=True)
class ImageHashes:
    """Two complementary 64-bit hashes: DCT-based ``phash`` and gradient-based ``dhash``.

    They fail differently (phash tolerates re-encoding and brightness, dhash small overlays), so
    candidate search on either catches more true copies than one alone.
    """

    phash: str
    dhash: str

    def __post_init__(self) -> None:
        _check_bits(self.phash)
        _check_bits(self.dhash)


# What imagehash resamples to before hashing: pHash a (hash_size * highfreq_factor 4) square, dHash
# one column wider than the hash. ``_hashes_of`` hands it these, so its own resize is a copy.
_PHASH_SIDE = _HASH_SIZE * 4
_DHASH_SIZE = (_HASH_SIZE + 1, _HASH_SIZE)
_FLIP = Image.Transpose.FLIP_LEFT_RIGHT


def _resampled(gray: Image.Image) -> tuple[Image.Image, Image.Image]:
    """The two small greyscale images pHash and dHash are computed from (imagehash's resampling)."""
    return (gray.resize((_PHASH_SIDE, _PHASH_SIDE), Image.Resampling.LANCZOS),
            gray.resize(_DHASH_SIZE, Image.Resampling.LANCZOS))


def _hashes_of(small: tuple[Image.Image, Image.Image]) -> ImageHashes:
    return ImageHashes(phash=_bits(imagehash.phash(small[0], hash_size=_HASH_SIZE)),
                       dhash=_bits(imagehash.dhash(small[1], hash_size=_HASH_SIZE)))


def perceptual_hashes(img: Image.Image) -> ImageHashes:
    """phash and dhash of a decoded image (any mode; imagehash works on greyscale)."""
    return _hashes_of(_resampled(img.convert("L")))


# A border line is uniform when 98% of its pixels are within this many grey levels (per channel) of
# its outermost line's median colour: JPEG ringing beside the content stays below it, texture does not.
_BORDER_TOLERANCE = 10
_BORDER_PERCENTILE = 98
_MIN_KEPT = 0.25  # never trim an image to less than this share of a side (a mostly flat picture)


def _uniform_run(lines: np.ndarray) -> int:
    """How many of ``lines`` (outermost first, shape (n, length, 3)) are uniform border.

    Lines are judged in growing blocks from the outside in, and the scan stops at the first block
    with a non-uniform line: the answer is the same as judging every line, but a photo without a
    border (most of them) costs a few lines per side instead of half the image."""
    reference = np.median(lines[0], axis=0)
    start, block = 0, 4
    while start < len(lines):
        deviation = np.abs(lines[start:start + block] - reference).max(axis=2)
        uniform = np.percentile(deviation, _BORDER_PERCENTILE, axis=1) <= _BORDER_TOLERANCE
        if not uniform.all():
            return start + int(np.argmin(uniform))
        start, block = start + block, min(block * 2, 64)
    return len(lines)


def trim_box(img: Image.Image) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the image without its uniform borders (each side on its own:
    letterboxing pads one or two sides, with any colour); the whole image when nothing is trimmed
    or trimming would leave too little."""
    rgb = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    h, w, _ = rgb.shape
    top = _uniform_run(rgb[: h // 2])
    bottom = _uniform_run(rgb[::-1][: h // 2])
    left = _uniform_run(rgb[:, : w // 2].transpose(1, 0, 2))
    right = _uniform_run(rgb[:, ::-1][:, : w // 2].transpose(1, 0, 2))
    box = (left, top, w - right, h - bottom)
    if box[2] - box[0] < max(8, w * _MIN_KEPT) or box[3] - box[1] < max(8, h * _MIN_KEPT):
        return (0, 0, w, h)
    return box


_CENTRE_SIDE = 0.5  # share of each side the centre hashes keep (tuned on the train split: 0.5-0.7)


def centre_box(size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the central ``_CENTRE_SIDE`` of each side of an image."""
    w, h = size
    left, top = int(w * (1 - _CENTRE_SIDE) / 2), int(h * (1 - _CENTRE_SIDE) / 2)
    return (left, top, max(w - left, left + 1), max(h - top, top + 1))


@dataclass(frozen=True)
class CandidateHashes:
    """What candidate search compares for one image: its plain hashes, those of its trimmed form
    and of the trimmed form's centre (both stored beside the plain ones), and those of the trimmed
    form mirrored left-right (query only)."""

    plain: ImageHashes
    trimmed: ImageHashes
    mirrored: ImageHashes
    centre: ImageHashes


def candidate_hashes(img: Image.Image) -> CandidateHashes:
    """The four hash pairs of one image. Bit for bit what ``perceptual_hashes`` gives for each form, at
    less than half its cost: the greyscale conversion is done once (a crop or a mirror of the grey
    image is the grey of the crop or the mirror), and the mirror's hashes come from the trimmed form's
    resampled images mirrored (the Lanczos kernel is symmetric: the same bits as resampling the mirror,
    on every one of 600 dataset photos and in tests/models/test_hashing.py; they are only ever a
    query's, never stored)."""
    gray = img.convert("L")
    box = trim_box(img)
    trimmed_gray = gray if box == (0, 0, *img.size) else gray.crop(box)
    small = _resampled(trimmed_gray)
    trimmed = _hashes_of(small)
    plain = _hashes_of(_resampled(gray)) if trimmed_gray is not gray else trimmed
    return CandidateHashes(plain=plain, trimmed=trimmed,
                           mirrored=_hashes_of((small[0].transpose(_FLIP), small[1].transpose(_FLIP))),
                           centre=_hashes_of(_resampled(trimmed_gray.crop(centre_box(trimmed_gray.size)))))


def candidate_distances(query: CandidateHashes, plain: ImageHashes, trimmed: ImageHashes | None,
                        centre: ImageHashes | None = None) -> tuple[int, int]:
    """(pHash, dHash) distance from a query to a stored image as candidate search measures it: the
    nearest of the four comparisons, per hash kind (``trimmed`` or ``centre`` None: a row stored
    before those hashes existed, compared by its plain ones). db/repositories/images.py runs the
    same rule in SQL."""
    stored = trimmed or plain
    middle = centre or plain
    return (min(hamming(query.plain.phash, plain.phash), hamming(query.trimmed.phash, stored.phash),
                hamming(query.mirrored.phash, stored.phash), hamming(query.centre.phash, middle.phash)),
            min(hamming(query.plain.dhash, plain.dhash), hamming(query.trimmed.dhash, stored.dhash),
                hamming(query.mirrored.dhash, stored.dhash), hamming(query.centre.dhash, middle.dhash)))


def hamming(a: str, b: str) -> int:
    """Number of differing bits between two ``bit(64)`` strings."""
    _check_bits(a)
    _check_bits(b)
    return (int(a, 2) ^ int(b, 2)).bit_count()
