"""Hostile images and image references through the whole pipeline (RabbitMQ, workers as enrich_worker).

Byte-level and URL-level checks of the fetcher and decoder live in tests/tasks/io/test_fetcher.py and
tests/models/test_images.py; here each hostile reference rides in a real product event, and the
checks are end to end: the job ends ``failed`` with its documented code, the backend receives
``listing.failed`` with that code, the valid events of the same burst finish ``done``, and no
connection reaches a refused address (counting listeners on the HTTP target and the S3 endpoint).
"""

from __future__ import annotations

import io
import struct
import uuid
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tasks.events import product_event_payload
from tests.integration.harness import Deployment
from tests.security.conftest import ALLOWED_BUCKET, CountingListener, record_burst, tenant, wait_messages
from workers.settings import StorageSettings

pytestmark = pytest.mark.integration

MAX_PIXELS = StorageSettings().max_pixels  # the deployment runs with the default cap


def png_declaring(width: int, height: int) -> bytes:
    """A ~70-byte PNG whose header declares ``width`` x ``height`` (a decompression bomb's shape:
    the decoder must refuse it from the header, before allocating anything)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def animated(fmt: str, frames: int) -> bytes:
    imgs = [Image.new("RGB", (2, 2), (i % 256, (i * 7) % 256, (i // 256) * 40)) for i in range(frames)]
    buf = io.BytesIO()
    imgs[0].save(buf, format=fmt, save_all=True, append_images=imgs[1:], duration=10, loop=0)
    return buf.getvalue()


def encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, format=fmt)
    return buf.getvalue()


def _event(t: str, ext: str, url: str, category: str, merchant: str = "m1") -> dict[str, Any]:
    return product_event_payload(tenant_id=t, merchant_id=merchant, external_id=ext, version=1, category=category,
                                 image_urls=[url], title=f"{category} {ext}", description="On a hanger.")


def test_hostile_images_fail_with_their_code_and_cost_nothing_else(
        secure_deployment: Deployment, hostile_dir: Path, sample_photos, s3_witness: CountingListener) -> None:  # noqa: ANN001
    dep = secure_deployment
    t = tenant("images")
    photo, category = sample_photos[2]
    side = int(MAX_PIXELS ** 0.5) + 1
    files: dict[str, bytes] = {
        "bomb_just_over": png_declaring(side, side),  # side*side is just over the cap
        "bomb_far_over": png_declaring(100_000, 100_000),  # 10 gigapixels declared
        "truncated_jpeg": photo.read_bytes()[: len(photo.read_bytes()) // 2],
        "zero_bytes": b"",
        "gif_thousands_of_frames": animated("GIF", 3000),
        "apng_thousands_of_frames": animated("PNG", 2000),  # PNG is allowed; the frame cap is what refuses it
        "bmp": encoded("BMP"),
        "tiff": encoded("TIFF"),
    }
    assert (side - 1) ** 2 <= MAX_PIXELS < side * side
    assert all(len(b) < 200_000 for b in files.values()), {k: len(b) for k, b in files.items()}
    run = uuid.uuid4().hex[:6]
    cases: dict[str, tuple[str, str]] = {}  # name -> (url, expected code)
    for name, data in files.items():
        path = hostile_dir / f"{run}-{name}.img"
        path.write_bytes(data)
        cases[name] = (path.as_uri(), "image_rejected")

    http_target = CountingListener()
    try:
        cases["loopback_http"] = (f"http://127.0.0.1:{http_target.port}/a.jpg", "url_not_allowed")
        cases["loopback_https_by_name"] = (f"https://localhost:{http_target.port}/a.jpg", "url_not_allowed")
        cases["s3_bucket_not_allowed"] = (f"s3://some-other-bucket/{t}/m1/a.jpg", "url_not_allowed")
        cases["s3_dotdot"] = (f"s3://{ALLOWED_BUCKET}/{t}/m1/../m2/a.jpg", "url_not_allowed")
        cases["s3_other_merchant"] = (f"s3://{ALLOWED_BUCKET}/{t}/m2/a.jpg", "url_not_allowed")
        cases["s3_other_tenant"] = (f"s3://{ALLOWED_BUCKET}/other-tenant/m1/a.jpg", "url_not_allowed")
        cases["file_outside_roots"] = ("file:///etc/hostname", "url_not_allowed")

        ids: dict[str, uuid.UUID] = {}
        valid: list[uuid.UUID] = []
        for n, (name, (url, _code)) in enumerate(cases.items()):  # interleaved with valid events
            if n % 4 == 0:
                p, c = sample_photos[(n // 4) * 2 % len(sample_photos)]
                valid.append(dep.publish(_event(t, f"ok{n}", p.as_uri(), c)))
            ids[name] = dep.publish(_event(t, name, url, category))
        rows = dep.wait_finished([*valid, *ids.values()], timeout=240)
        msgs = wait_messages(dep, [str(i) for i in [*valid, *ids.values()]])
        refused = http_target.connections + s3_witness.connections
        record_burst("hostile images and references", rows, published=len(rows), refused_connections=refused)
    finally:
        http_target.close()

    assert {rows[i].status for i in valid} == {"done"}, [(rows[i].status, rows[i].error_code) for i in valid]
    got = {name: (rows[eid].status, rows[eid].error_code) for name, eid in ids.items()}
    assert got == {name: ("failed", code) for name, (_url, code) in cases.items()}
    for name, eid in ids.items():
        msg = msgs[str(eid)]
        assert msg["event_type"] == "listing.failed" and msg["code"] == cases[name][1], (name, msg)
        assert msg["retryable"] is False and msg["product"]["external_id"] == name and msg["detail"], (name, msg)
    details = {name: msgs[str(eid)]["detail"] for name, eid in ids.items()}
    assert "bucket" in details["s3_bucket_not_allowed"] and "prefix" in details["s3_other_merchant"]
    assert "prefix" in details["s3_other_tenant"] and "key" in details["s3_dotdot"]
    assert refused == 0, f"{http_target.connections} HTTP and {s3_witness.connections} S3 connections were made"
