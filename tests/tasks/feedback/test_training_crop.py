"""The DPO trainer shows the listing model the crop it read in the pipeline (``models.boxes.product_crop``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from models.grounding import Grounder
from models.images import decode_image
from tasks.feedback.training import _image
from tasks.io.blobs import LocalBlobStore


def test_training_images_are_the_pipelines_crops(sample_photos, tmp_path: Path) -> None:
    path, category = sample_photos[0]
    originals = LocalBlobStore(tmp_path)
    uri = originals.put("originals/acme/x", path.read_bytes())
    photo = decode_image(path.read_bytes()).image
    for threshold in (0.0, 1.0):  # grounded, then fallen back
        grounder = Grounder(profile="tiny", device="cpu", threshold=threshold, padding=0.1)
        g = grounder.predict([photo], [category])[0]
        row = {"images": [uri], "image_box": None if g.fallback else list(g.box)}  # as the pair builder writes it
        image = _image(originals, row, {}, grounder.padding)
        assert image.size == g.crop.size
        assert np.array_equal(np.asarray(image), np.asarray(g.crop))
    assert isinstance(image, Image.Image)
