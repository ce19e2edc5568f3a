"""Persisted form of near-duplicate features (``models.dedup.LocalFeatures``).

The fetch stage stores each new image's features beside its original
(``tasks.pipeline.dedup_features``), so a candidate's are read back instead of extracted again.
The bytes are lossless: a decision never depends on which of the two images came from storage.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np

from models.dedup import LocalFeatures

# The layout of persisted features (``features_to_bytes``); bump it with any change to what
# ``NearDuplicateVerifier.features`` extracts, so features stored by an older build are recomputed.
# 2: 500 ORB keypoints per orientation (1: 1,000).
FEATURES_FORMAT = 2
_ARRAYS = ("points", "descriptors", "thumb")


def features_to_bytes(features: LocalFeatures) -> bytes:
    """Lossless bytes of one image's features and its mirror's (numpy ``.npz``, no pickles): a
    stored candidate decodes to exactly what extraction gave, so a decision does not depend on
    which of the two images came from storage. Stored uncompressed: ORB descriptors hardly compress
    (64 KB against 56 KB deflated), and deflating cost 1.35 ms of CPU per new image and inflating
    0.9 ms per candidate read back, against 0.21 and 0.52 ms now. ``features_from_bytes`` reads both."""
    mirrored = features.mirrored
    arrays: dict[str, np.ndarray] = {"format": np.array([FEATURES_FORMAT], np.int32)}
    for prefix, f in (("", features), ("m_", mirrored)):
        if f is None:
            continue
        arrays.update({prefix + name: getattr(f, name) for name in _ARRAYS})
        arrays[prefix + "work_shape"] = np.array(f.work_shape, np.int32)
        arrays[prefix + "key"] = np.frombuffer(f.key, np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def features_from_bytes(data: bytes) -> LocalFeatures:
    """The inverse of ``features_to_bytes``; ``ValueError`` for anything else (another format, a
    truncated or foreign file)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            if "format" not in z or int(z["format"][0]) != FEATURES_FORMAT:
                raise ValueError("not features of this format")

            def one(prefix: str) -> LocalFeatures | None:
                if prefix + "points" not in z:
                    return None
                shape = z[prefix + "work_shape"]
                return LocalFeatures(z[prefix + "points"].astype(np.float32),
                                     z[prefix + "descriptors"].astype(np.uint8), z[prefix + "thumb"].astype(np.uint8),
                                     (int(shape[0]), int(shape[1])), z[prefix + "key"].tobytes())

            plain, mirrored = one(""), one("m_")
    except (OSError, KeyError, EOFError, IndexError, zipfile.BadZipFile) as exc:
        raise ValueError(f"unreadable features: {type(exc).__name__}") from None
    if plain is None:
        raise ValueError("features without the image's own orientation")
    return LocalFeatures(plain.points, plain.descriptors, plain.thumb, plain.work_shape, plain.key, mirrored)
