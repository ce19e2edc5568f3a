"""Box geometry of grounding, as plain functions (no torch): the detector uses them, and so does
anything that redraws a crop from stored coordinates (``enrich report``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Box = tuple[float, float, float, float]


def clip_box(box: Box, size: tuple[int, int]) -> Box | None:
    """The box limited to the image; None when nothing of it is inside (random or broken detections)."""
    width, height = size
    a, b, c, d = (float(v) for v in box)
    # Untrained or degenerate heads can emit inverted corners; order them before clipping.
    x0, x1, y0, y1 = min(a, c), max(a, c), min(b, d), max(b, d)
    x0, x1 = max(0.0, min(x0, width)), max(0.0, min(x1, width))
    y0, y1 = max(0.0, min(y0, height)), max(0.0, min(y1, height))
    if x1 - x0 < 1.0 or y1 - y0 < 1.0:
        return None
    return (x0, y0, x1, y1)


def padded_crop_box(box: Box, size: tuple[int, int], padding: float) -> tuple[int, int, int, int]:
    """Integer crop rectangle: ``box`` grown by ``padding`` × its width/height per side, inside the image.

    Detectors box the garment tightly; a little context (collar, hem) helps the VLM and CLIP.
    """
    width, height = size
    x0, y0, x1, y1 = box
    pad_x, pad_y = (x1 - x0) * padding, (y1 - y0) * padding
    left, top = max(0, int(x0 - pad_x)), max(0, int(y0 - pad_y))
    right, bottom = min(width, int(round(x1 + pad_x))), min(height, int(round(y1 + pad_y)))
    return left, top, max(right, left + 1), max(bottom, top + 1)


def product_crop(image: Any, box: Sequence[float] | None, padding: float) -> Any:
    """The part of a photo the pipeline describes and embeds: the detector box grown by ``padding``
    (``padded_crop_box``), or the whole photo where there is no box to trust (``None``: the
    grounding fell back). The one rule for the GPU stage, the embedding backfill and the embedder's
    training rows, so a stored vector and a recomputed one always see the same pixels."""
    if not box:
        return image
    x0, y0, x1, y1 = (float(c) for c in box[:4])
    return image.crop(padded_crop_box((x0, y0, x1, y1), image.size, padding))
