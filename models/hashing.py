"""Content and perceptual hashes of images.

SHA-256 of the raw bytes is the exact-duplicate key (images are content-addressed). The perceptual
hashes only *propose* near-duplicate candidates: they are stored as Postgres ``bit(64)`` and searched
with Hamming distance, so they are rendered as 64-character '0'/'1' strings, the text form that
``bit(64)`` accepts and returns.
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


def perceptual_hashes(img: Image.Image) -> ImageHashes:
    """phash and dhash of a decoded image (any mode; imagehash works on greyscale)."""
    return ImageHashes(
        phash=_bits(imagehash.phash(img, hash_size=_HASH_SIZE)),
        dhash=_bits(imagehash.dhash(img, hash_size=_HASH_SIZE)),
    )


def hamming(a: str, b: str) -> int:
    """Number of differing bits between two ``bit(64)`` strings."""
    _check_bits(a)
    _check_bits(b)
    return (int(a, 2) ^ int(b, 2)).bit_count()
