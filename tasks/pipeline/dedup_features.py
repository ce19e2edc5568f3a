"""Local features of stored images for near-duplicate verification, persisted once at ingest.

Verifying a candidate needs its ORB keypoints, descriptors and thumbnails (``models.dedup``).
Extracting them means reading the original from blob storage, decoding it and running ORB twice
(image and mirror): about 18 ms of CPU per candidate on the clothing photos, up to
``2 * CANDIDATE_K`` candidates per new image, and once a catalogue outgrows the per-process cache
nearly every candidate misses it. So the fetch stage writes each new image's features beside its
original (``features/v<FEATURES_FORMAT>/<tenant>/<aa>/<sha256>.npz``, about 55 KB,
content-addressed like the original) when it extracts them for its own verification, and a later
candidate load reads them back (one blob read, 1.3-1.8 ms CPU: infra/bench/bench_dedup_scaling.py)
instead. An image stored before this, or by another feature format, is extracted from its
original once and its features written then.
"""

from __future__ import annotations

import structlog

from models.dedup import LocalFeatures
from models.dedup_io import FEATURES_FORMAT, features_from_bytes, features_to_bytes
from models.images import decode_image
from tasks.errors import PipelineError, TransientError
from tasks.io.blobs import original_key
from tasks.runtime import Runtime

log = structlog.get_logger(__name__)


def features_key(tenant_id: str, sha256: str) -> str:
    return f"features/v{FEATURES_FORMAT}/{original_key(tenant_id, sha256).removeprefix('originals/')}.npz"


def remember(runtime: Runtime, tenant_id: str, image_id: int, sha256: str,
             features: LocalFeatures) -> LocalFeatures:
    """Cache the features of an image this stage just extracted and persist them (idempotent: the
    same image always gives the same bytes under the same key)."""
    runtime.blobs.put(features_key(tenant_id, sha256), features_to_bytes(features))
    return runtime.feature_cache.put(image_id, features)


def load(runtime: Runtime, tenant_id: str, image_id: int, sha256: str, original_uri: str) -> LocalFeatures:
    """A stored image's features: the per-process cache, else its persisted features, else
    extracted from its original (and persisted for next time)."""
    cached = runtime.feature_cache.get(image_id)
    if cached is not None:
        return cached
    if sha256:
        try:
            data = runtime.blobs.get(runtime.blobs.uri_for(features_key(tenant_id, sha256)))
            stored = features_from_bytes(data)
            return runtime.feature_cache.put(image_id, stored)
        except TransientError:
            raise
        except (PipelineError, ValueError) as exc:  # not persisted yet (an older image), or another format
            log.debug("dedup.features_extracted", image_id=image_id, reason=str(exc))
    image = decode_image(runtime.blobs.get(original_uri), runtime.image_limits).image
    features = runtime.dedup_verifier.features(image)
    if not sha256:
        return runtime.feature_cache.put(image_id, features)
    return remember(runtime, tenant_id, image_id, sha256, features)
