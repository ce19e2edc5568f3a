"""Safe decoding of untrusted image bytes into an RGB ``PIL.Image``.

Merchant images arrive from arbitrary URLs, so every check runs on the header before any pixel
is decoded: the format is sniffed from magic bytes and must be allow-listed, the pixel count and
frame count are capped, and only then is the image decoded in full. Truncated files are rejected
(``ImageFile.LOAD_TRUNCATED_IMAGES`` is deliberately left at its default ``False``). Every refusal
raises :class:`~models.errors.ImageRejected` with a reason from :class:`RejectReason`, so a failed
listing can say exactly why.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from models.errors import ImageRejected

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})


class RejectReason(StrEnum):
    """Closed set of reasons carried by ``ImageRejected.reason``; values are stable wire strings."""

    EMPTY = "empty"
    UNKNOWN_FORMAT = "unknown_format"
    FORMAT_NOT_ALLOWED = "format_not_allowed"
    FORMAT_MISMATCH = "format_mismatch"
    TOO_MANY_PIXELS = "too_many_pixels"
    TOO_MANY_FRAMES = "too_many_frames"
    TRUNCATED = "truncated"
    UNDECODABLE = "undecodable"


@dataclass(frozen=True)
class ImageLimits:
    """What an accepted image may be. ``allowed_formats`` uses PIL format names."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_frames: int = 1
    allowed_formats: frozenset[str] = field(default=DEFAULT_ALLOWED_FORMATS)

    def __post_init__(self) -> None:
        if self.max_pixels <= 0 or self.max_frames <= 0:
            raise ValueError("max_pixels and max_frames must be positive")


@dataclass(frozen=True)
class DecodedImage:
    """An accepted image: RGB, EXIF orientation applied; width/height are after orientation."""

    image: Image.Image
    format: str
    width: int
    height: int


# (offset, signature, PIL format name). Includes formats we refuse, so a GIF is reported as
# "format_not_allowed" rather than "unknown_format".
_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\xff\xd8\xff", "JPEG"),
    (0, b"\x89PNG\r\n\x1a\n", "PNG"),
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (0, b"BM", "BMP"),
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
    (0, b"\x00\x00\x01\x00", "ICO"),
    (0, b"8BPS", "PSD"),
)

_DECLARED_ALIASES = {
    "JPG": "JPEG",
    "JPEG": "JPEG",
    "PJPEG": "JPEG",
    "PNG": "PNG",
    "APNG": "PNG",
    "WEBP": "WEBP",
    "GIF": "GIF",
    "BMP": "BMP",
    "TIF": "TIFF",
    "TIFF": "TIFF",
}


def sniff_format(data: bytes) -> str | None:
    """PIL format name from the leading magic bytes, or ``None`` when unrecognised."""
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for offset, signature, name in _MAGIC:
        if data[offset : offset + len(signature)] == signature:
            return name
    return None


def normalize_format(declared: str) -> str:
    """Map a declared type (``image/jpeg``, ``jpg``, ``.png``) to a PIL format name."""
    token = declared.strip().split(";")[0].rsplit("/", 1)[-1].lstrip(".").upper()
    token = token.removeprefix("X-")
    return _DECLARED_ALIASES.get(token, token)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB copy of ``img``; transparency is composited on white, as marketplaces display it."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale (PNG): scale to 8 bits instead of letting convert() clip at 255.
        scale = 1 / 256 if img.mode.startswith("I;16") else 1 / 65536
        img = img.point(lambda v: v * scale).convert("L")
    if img.mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def _reject(detail: str, reason: RejectReason) -> ImageRejected:
    return ImageRejected(detail, reason=reason.value)


def _check_header(data: bytes, limits: ImageLimits, declared_format: str | None) -> str:
    if not data:
        raise _reject("image has zero bytes", RejectReason.EMPTY)
    sniffed = sniff_format(data)
    if sniffed is None:
        raise _reject("unrecognised image signature", RejectReason.UNKNOWN_FORMAT)
    if sniffed not in limits.allowed_formats:
        raise _reject(f"format {sniffed} is not allowed", RejectReason.FORMAT_NOT_ALLOWED)
    if declared_format is not None and normalize_format(declared_format) != sniffed:
        raise _reject(
            f"declared {declared_format!r} but bytes are {sniffed}", RejectReason.FORMAT_MISMATCH
        )
    return sniffed


def _open_lazily(data: bytes, sniffed: str, limits: ImageLimits) -> Image.Image:
    """Parse the header only (PIL decodes pixels lazily) and enforce the size and frame caps."""
    try:
        with warnings.catch_warnings():
            # Our own cap (checked below) is the policy; PIL's warning threshold is not.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[sniffed])
    except Image.DecompressionBombError as exc:
        raise _reject(f"header declares a decompression bomb: {exc}", RejectReason.TOO_MANY_PIXELS) from exc
    except UnidentifiedImageError as exc:
        raise _reject(f"{sniffed} signature but unreadable header", RejectReason.UNDECODABLE) from exc
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as exc:
        raise _reject(f"unreadable {sniffed} header: {exc}", RejectReason.UNDECODABLE) from exc
    if img.format != sniffed:
        raise _reject(f"magic says {sniffed}, decoder says {img.format}", RejectReason.FORMAT_MISMATCH)
    width, height = img.size
    if width <= 0 or height <= 0:
        raise _reject("image has no pixels", RejectReason.UNDECODABLE)
    if width * height > limits.max_pixels:
        raise _reject(
            f"{width}x{height} exceeds {limits.max_pixels} pixels", RejectReason.TOO_MANY_PIXELS
        )
    frames = getattr(img, "n_frames", 1)
    if frames > limits.max_frames:
        raise _reject(f"{frames} frames exceeds {limits.max_frames}", RejectReason.TOO_MANY_FRAMES)
    return img


def _load_pixels(img: Image.Image, sniffed: str) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except Image.DecompressionBombError as exc:
        raise _reject(str(exc), RejectReason.TOO_MANY_PIXELS) from exc
    except (OSError, SyntaxError, ValueError, struct.error, EOFError, zlib.error) as exc:
        truncated = "truncated" in str(exc).lower() or isinstance(exc, EOFError)
        reason = RejectReason.TRUNCATED if truncated else RejectReason.UNDECODABLE
        raise _reject(f"{sniffed} pixel data: {exc}", reason) from exc


def _apply_orientation(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError, struct.error):
        # A malformed EXIF block says nothing about the pixels; keep them as stored.
        log.warning("image.exif_orientation_ignored")
        return img


def decode_image(
    data: bytes, limits: ImageLimits | None = None, *, declared_format: str | None = None
) -> DecodedImage:
    """Decode untrusted bytes or raise ``ImageRejected`` with a :class:`RejectReason`.

    ``declared_format`` (a MIME type, extension or format name, e.g. from ``Content-Type``) is
    optional; when given it must agree with the magic bytes.
    """
    limits = limits or ImageLimits()
    sniffed = _check_header(data, limits, declared_format)
    img = _open_lazily(data, sniffed, limits)
    _load_pixels(img, sniffed)
    rgb = to_rgb(_apply_orientation(img))
    return DecodedImage(image=rgb, format=sniffed, width=rgb.width, height=rgb.height)


def load_image_file(
    path: str | Path, limits: ImageLimits | None = None, *, declared_format: str | None = None
) -> DecodedImage:
    """Read and decode a local file with the same checks as fetched bytes."""
    return decode_image(Path(path).read_bytes(), limits, declared_format=declared_format)
