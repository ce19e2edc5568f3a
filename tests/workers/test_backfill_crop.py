"""The embedding backfill sees the pixels the GPU stage saw.

A stored product vector and one a backfill recomputes for the same listing must come from the same
crop: the grounding box padded by ``ENRICH_MODELS__CROP_PADDING``, or the whole photo where the
grounding fell back, on the photo decoded as fetch decodes it (EXIF orientation applied). Same clip,
same crop: the same vector.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from db import embedding_versions as ev
from models.embeddings import ClipEmbedder
from models.grounding import Grounder
from models.images import decode_image
from workers.cli.embeddings import ModelEmbedder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def clip() -> ClipEmbedder:
    embedder = ClipEmbedder(profile="tiny", device="cpu")
    embedder.load()
    return embedder


def _rotated_jpeg(path: Path) -> bytes:
    """The photo stored sideways with an EXIF orientation tag, as phones upload them."""
    image = Image.open(path).convert("RGB").transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90° clockwise to display
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=95, exif=exif)
    return out.getvalue()


@pytest.mark.parametrize("threshold", [0.0, 1.0], ids=["grounded", "fallback"])
def test_backfill_recomputes_the_vector_the_pipeline_stored(clip: ClipEmbedder, sample_photos, threshold: float) -> None:
    path, category = sample_photos[0]
    stored = _rotated_jpeg(path)
    decoded = decode_image(stored).image  # what fetch hands the GPU stage
    grounder = Grounder(profile="tiny", device="cpu", threshold=threshold, padding=0.1)
    result = grounder.predict([decoded], [category])[0]
    assert result.fallback is (threshold == 1.0)
    pipeline_vector = clip.embed_images([result.crop])[0]

    # What pending_items hands the backfill: the box unless the grounding fell back.
    item = ev.BackfillItem(1, "acme", 1, category, 1, "originals/x", None if result.fallback else list(result.box), "")
    backfill = ModelEmbedder(clip, lambda uri: stored, crop_padding=grounder.padding)
    image_vectors, _, photo_vectors = backfill([item])
    assert len(photo_vectors[0]) == 0  # no recorded photos: none written, the primary alone makes the vector
    np.testing.assert_allclose(image_vectors[0], pipeline_vector, rtol=1e-5, atol=1e-6)

    if not result.fallback:
        # The old backfill's cut (raw box, no padding, EXIF ignored) is another vector.
        raw = Image.open(io.BytesIO(stored)).convert("RGB").crop(tuple(int(round(c)) for c in result.box))
        assert not np.allclose(clip.embed_images([raw])[0], pipeline_vector, atol=1e-4)
