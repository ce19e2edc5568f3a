"""Safe decoding: real photos accepted, every rejection kind refused with its stable reason."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from models.errors import ImageRejected
from models.images import (
    DecodedImage,
    ImageLimits,
    RejectReason,
    decode_image,
    load_image_file,
    sniff_format,
    to_rgb,
)


def _encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of the given size whose all-zero rows compress to almost nothing."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed pixels
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _reason(data: bytes, limits: ImageLimits | None = None, **kw: object) -> str | None:
    with pytest.raises(ImageRejected) as info:
        decode_image(data, limits, **kw)
    assert info.value.code == "image_rejected"
    assert info.value.reason in set(RejectReason)
    return info.value.reason


@pytest.fixture(scope="module")
def photo_bytes(sample_photos: list[tuple[Path, str]]) -> bytes:
    return sample_photos[0][0].read_bytes()


@pytest.fixture
def forbid_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails the test if anything starts decoding pixel data."""

    def boom(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixel data decoded before the header checks rejected the image")

    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)


def test_real_photos_decode_to_rgb(sample_photos: list[tuple[Path, str]], manifest: list[dict]) -> None:
    sizes = {r["path"]: (int(r["width"]), int(r["height"])) for r in manifest}
    for path, _ in sample_photos:
        decoded = load_image_file(path)
        assert isinstance(decoded, DecodedImage)
        assert decoded.format == "JPEG"
        assert decoded.image.mode == "RGB"
        assert decoded.image.size == (decoded.width, decoded.height)
        rel = path.relative_to(path.parents[2]).as_posix()
        assert sorted(decoded.image.size) == sorted(sizes[rel])


def test_zero_bytes_rejected() -> None:
    assert _reason(b"") == RejectReason.EMPTY


@pytest.mark.parametrize("keep", [0.2, 0.5, 0.9, 0.999])
def test_truncated_jpeg_rejected(photo_bytes: bytes, keep: float) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert _reason(photo_bytes[: int(len(photo_bytes) * keep)]) == RejectReason.TRUNCATED


def test_png_bomb_just_over_cap_rejected_before_decoding(forbid_pixel_decoding: None) -> None:
    bomb = png_bomb(6400, 6300)  # 40.32 Mpx, just over the 40 Mpx default
    assert len(bomb) < 20_000
    assert _reason(bomb) == RejectReason.TOO_MANY_PIXELS


@pytest.mark.parametrize("side", [10_000, 20_000])  # 100 Mpx (our cap), 400 Mpx (PIL's own error)
def test_png_bomb_far_over_cap_rejected_before_decoding(forbid_pixel_decoding: None, side: int) -> None:
    bomb = png_bomb(side, side)
    assert len(bomb) < 100_000
    assert _reason(bomb) == RejectReason.TOO_MANY_PIXELS


def test_pixel_cap_boundary_is_inclusive() -> None:
    limits = ImageLimits(max_pixels=10_000)
    assert decode_image(_encode(Image.new("RGB", (100, 100)), "PNG"), limits).width == 100
    assert _reason(_encode(Image.new("RGB", (101, 100)), "PNG"), limits) == RejectReason.TOO_MANY_PIXELS


def test_real_photo_over_configured_cap_rejected(photo_bytes: bytes) -> None:
    assert _reason(photo_bytes, ImageLimits(max_pixels=100_000)) == RejectReason.TOO_MANY_PIXELS


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_animation_over_frame_cap_rejected(fmt: str) -> None:
    frames = [Image.new("RGB", (16, 16), (60 * i, 0, 0)) for i in range(3)]
    data = _encode(frames[0], fmt, save_all=True, append_images=frames[1:])
    assert _reason(data) == RejectReason.TOO_MANY_FRAMES
    assert decode_image(data, ImageLimits(max_frames=3)).image.getpixel((0, 0))[0] == 0


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_formats_outside_allow_list_rejected(fmt: str) -> None:
    data = _encode(Image.new("RGB", (8, 8)), fmt)
    assert sniff_format(data) == fmt
    assert _reason(data) == RejectReason.FORMAT_NOT_ALLOWED


def test_allow_list_is_configurable(photo_bytes: bytes) -> None:
    png = _encode(Image.new("RGB", (8, 8)), "PNG")
    only_jpeg = ImageLimits(allowed_formats=frozenset({"JPEG"}))
    assert _reason(png, only_jpeg) == RejectReason.FORMAT_NOT_ALLOWED
    assert decode_image(photo_bytes, only_jpeg).format == "JPEG"


def test_declared_format_must_match_magic_bytes(photo_bytes: bytes) -> None:
    png = _encode(Image.new("RGB", (8, 8)), "PNG")
    assert _reason(png, declared_format="image/jpeg") == RejectReason.FORMAT_MISMATCH
    assert _reason(photo_bytes, declared_format="photo.png") == RejectReason.FORMAT_MISMATCH
    assert decode_image(photo_bytes, declared_format="image/jpeg").format == "JPEG"
    assert decode_image(photo_bytes, declared_format="jpg").format == "JPEG"


def test_unknown_signature_and_corrupt_header_rejected() -> None:
    assert _reason(b"<html>not an image</html>") == RejectReason.UNKNOWN_FORMAT
    assert _reason(b"\xff\xd8\xff" + b"\x00" * 64) == RejectReason.UNDECODABLE


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\xff\xd8\xff\xe0rest", "JPEG"),
        (b"\x89PNG\r\n\x1a\nrest", "PNG"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "WEBP"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", None),
        (b"GIF89a", "GIF"),
        (b"", None),
    ],
)
def test_sniff_format(data: bytes, expected: str | None) -> None:
    assert sniff_format(data) == expected


def test_exif_orientation_applied(sample_photos: list[tuple[Path, str]]) -> None:
    original = load_image_file(sample_photos[0][0]).image
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    data = _encode(original, "JPEG", quality=95, exif=exif.tobytes())
    decoded = decode_image(data)
    assert (decoded.width, decoded.height) == (original.height, original.width)
    expected = np.asarray(original.transpose(Image.Transpose.ROTATE_270), dtype=np.int16)
    assert np.abs(np.asarray(decoded.image, dtype=np.int16) - expected).mean() < 4


def test_rgba_composited_on_white() -> None:
    rgba = Image.new("RGBA", (3, 1), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (255, 0, 0, 255))
    rgba.putpixel((2, 0), (0, 0, 0, 128))
    decoded = decode_image(_encode(rgba, "PNG"))
    assert decoded.image.mode == "RGB"
    assert decoded.image.getpixel((0, 0)) == (255, 255, 255)
    assert decoded.image.getpixel((1, 0)) == (255, 0, 0)
    assert all(120 <= c <= 135 for c in decoded.image.getpixel((2, 0)))


def test_palette_transparency_and_greyscale_to_rgb() -> None:
    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0
    assert to_rgb(pal).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(pal).getpixel((1, 0)) == (0, 255, 0)
    wide = Image.new("I;16", (1, 1), 65535)
    assert to_rgb(wide).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("LA", (1, 1), (0, 0))).getpixel((0, 0)) == (255, 255, 255)


def test_limits_validate() -> None:
    with pytest.raises(ValueError):
        ImageLimits(max_pixels=0)
