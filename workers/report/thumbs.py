"""Downscaled copies of the stored originals, as data URIs the single-file report embeds.

Originals are merchant bytes, so they go through the pipeline's safe decoder (magic bytes, pixel
cap, EXIF orientation: the orientation the grounding box's pixels refer to). One decode per image.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import structlog
from PIL import Image

from db.repositories.report_views import StoredPhoto
from models.errors import ImageRejected
from models.images import ImageLimits, decode_image
from tasks.errors import PipelineError
from tasks.io.blobs import BlobStore

log = structlog.get_logger(__name__)

PHOTO_PX = 360  # longest side of a product photo in the report
CROP_PX = 180
SMALL_PX = 96  # duplicates and neighbours
JPEG_QUALITY = 72


@dataclass(frozen=True)
class Thumb:
    uri: str
    width: int
    height: int


@dataclass(frozen=True)
class Pictures:
    """What the page embeds: product photos by image id (``None``: unreadable), crops by listing
    id, and the small thumbnails of duplicates and neighbours by image id (each emitted once)."""

    photos: dict[int, Thumb | None]
    crops: dict[int, Thumb | None]
    small: dict[int, Thumb]


class Thumbnails:
    """Thumbnails of stored originals, each made once. Only the last decoded original is kept (the
    report asks for a photo and then its crop), so memory stays flat however many products it shows;
    an original that cannot be read gives ``None`` and one warning."""

    def __init__(self, blobs: BlobStore, limits: ImageLimits | None = None) -> None:
        self._blobs = blobs
        self._limits = limits or ImageLimits()
        self._last: tuple[int, Image.Image | None] | None = None
        self._made: dict[tuple[int, int], Thumb | None] = {}
        self.unreadable: dict[int, str] = {}

    def original(self, photo: StoredPhoto) -> Image.Image | None:
        if photo.image_id in self.unreadable:
            return None
        if self._last is None or self._last[0] != photo.image_id:
            self._last = (photo.image_id, self._read(photo))
        return self._last[1]

    def _read(self, photo: StoredPhoto) -> Image.Image | None:
        try:
            return decode_image(self._blobs.get(photo.storage_uri), self._limits).image
        except (PipelineError, ImageRejected) as exc:
            self.unreadable[photo.image_id] = str(exc)
            log.warning("report.original_unreadable", image_id=photo.image_id, uri=photo.storage_uri, error=str(exc))
            return None

    def photo(self, photo: StoredPhoto, px: int = PHOTO_PX) -> Thumb | None:
        key = (photo.image_id, px)
        if key not in self._made:
            image = self.original(photo)
            self._made[key] = None if image is None else encode(image, px)
        return self._made[key]

    def crop(self, photo: StoredPhoto, rect: tuple[int, int, int, int], px: int = CROP_PX) -> Thumb | None:
        """``rect`` in the original's pixels (the stored box's coordinate system)."""
        image = self.original(photo)
        if image is None:
            return None
        sx, sy = image.width / photo.width, image.height / photo.height
        left, top, right, bottom = rect
        scaled = (round(left * sx), round(top * sy), max(round(right * sx), round(left * sx) + 1),
                  max(round(bottom * sy), round(top * sy) + 1))
        return encode(image.crop(scaled), px)


def encode(image: Image.Image, px: int) -> Thumb:
    small = image.copy()
    small.thumbnail((px, px), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    small.convert("RGB").save(buf, "JPEG", quality=JPEG_QUALITY, optimize=True)
    uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return Thumb(uri, small.width, small.height)
