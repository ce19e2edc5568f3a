"""Product events in through RabbitMQ, real Celery workers, embedded Postgres; listings out."""

from __future__ import annotations

import json
import pickle
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text

from tasks.events import product_event_payload, validate
from tests.integration.conftest import tenant
from tests.integration.harness import Deployment

pytestmark = pytest.mark.integration


def event(t: str, ext: str, photo: Path, category: str, *, version: int = 1, title: str | None = None,  # noqa: ANN003
          **kw) -> dict:
    return product_event_payload(tenant_id=t, merchant_id="m1", external_id=ext, version=version,
                                 category=category, image_urls=[photo.as_uri()], title=title or f"{category} {ext}",
                                 description="Photographed on a hanger.", attributes={"brand": "Acme"}, **kw)


def test_many_products_end_to_end(deployment: Deployment, sample_photos, engine) -> None:  # noqa: ANN001
    t = tenant()
    photos = sample_photos[::2][:8]
    ids = [deployment.publish(event(t, f"p{i}", path, cat)) for i, (path, cat) in enumerate(photos)]
    rows = deployment.wait_finished(ids)
    assert {r.status for r in rows.values()} == {"done"}, [(r.status, r.error_code) for r in rows.values()]
    with engine.connect() as conn:
        listings = conn.execute(text(
            "SELECT l.content, l.random_weights, l.schema_id, e.dims, vector_dims(e.image_embedding) AS d"
            "  FROM listings l JOIN embeddings e ON e.listing_id = l.id WHERE l.tenant_id = :t"), {"t": t}).all()
    assert len(listings) == len(photos)
    for row in listings:
        assert row.random_weights is True and row.dims == row.d == 512
        for attr in row.content["attributes"].values():
            assert attr["source"] in ("image", "merchant") and 0 <= attr["confidence"] <= 1
        assert row.content["attributes"]["brand"] == {"value": "Acme", "confidence": 1.0, "source": "merchant"}
    out = [m for m in deployment.drain_listing_events() if m.get("tenant_id") == t]
    assert len(out) == len(photos) and {m["event_type"] for m in out} == {"listing.enriched"}
    assert {uuid.UUID(m["causation_id"]) for m in out} == set(ids)
    for m in out:
        validate(m, "listing.enriched")
        assert m["models"]["random_weights"] is True


def test_same_event_twice_is_one_listing(deployment: Deployment, sample_photos, engine) -> None:  # noqa: ANN001
    t = tenant()
    path, cat = sample_photos[1]
    payload = event(t, "dup", path, cat)
    eid = deployment.publish(payload)
    deployment.wait_finished([eid])
    deployment.publish(payload)  # redelivered / re-published by the backend
    deployment.publish(payload)
    deployment.wait_finished([eid])
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM enrichment_jobs WHERE tenant_id=:t"), {"t": t}).scalar() == 1
        assert conn.execute(text("SELECT count(*) FROM listings WHERE tenant_id=:t"), {"t": t}).scalar() == 1
    import time

    time.sleep(2)  # let any duplicate publication surface
    out = [m for m in deployment.drain_listing_events() if m.get("tenant_id") == t]
    assert len(out) == 1


def test_older_version_after_newer_is_ignored(deployment: Deployment, sample_photos, engine) -> None:  # noqa: ANN001
    t = tenant()
    path, cat = sample_photos[2]
    newer = deployment.publish(event(t, "ver", path, cat, version=5))
    deployment.wait_finished([newer])
    older = deployment.publish(event(t, "ver", path, cat, version=3))
    rows = deployment.wait_finished([older])
    assert rows[older].inbox == "stale" and rows[older].job_id is None
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version FROM products WHERE tenant_id=:t"), {"t": t}).scalar() == 5
    failed = [m for m in deployment.drain_listing_events() if m.get("tenant_id") == t and m["event_type"] == "listing.failed"]
    assert [m["code"] for m in failed] == ["stale_version"] and failed[0]["causation_id"] == str(older)


def test_identical_image_in_second_product_does_no_model_work(deployment: Deployment, sample_photos, engine) -> None:  # noqa: ANN001
    """A true re-listing (same photo, same merchant text and attributes) is copied; the same photo
    with other merchant text is generated afresh (its listing must not carry the first one's text)."""
    t = tenant()
    path, cat = sample_photos[3]
    first = deployment.publish(event(t, "orig", path, cat, title="Same listing twice"))
    deployment.wait_finished([first])
    other = deployment.publish(event(t, "other-text", path, cat, title="Another merchant's wording"))
    other_job = deployment.wait_finished([other])[other]
    assert other_job.status == "done" and "model" in other_job.attempts  # other inputs: the model ran
    assert other_job.work["reuse_listing_id"] is None
    second = deployment.publish(event(t, "copy", path, cat, title="Same listing twice"))
    rows = deployment.wait_finished([second])
    job = rows[second]
    assert job.status == "done"
    assert "model" not in job.attempts and "describe" not in job.timings_ms  # no model stage ran
    assert job.work["reuse_listing_id"] is not None
    assert job.work["duplicates"][0]["kind"] == "exact" and job.work["duplicates"][0]["duplicate_of_product"] == "orig"
    with engine.connect() as conn:
        n_images = conn.execute(text("SELECT count(*) FROM images WHERE tenant_id=:t"), {"t": t}).scalar()
        contents = conn.execute(text("SELECT content FROM listings WHERE tenant_id=:t ORDER BY id"), {"t": t}).scalars().all()
    assert n_images == 1 and contents[0] == contents[2] and len(contents) == 3
    msgs = {m["product"]["external_id"]: m for m in deployment.drain_listing_events() if m.get("tenant_id") == t}
    assert msgs["copy"]["listing"]["reused_from_listing_id"] == msgs["orig"]["listing"]["listing_id"]
    assert msgs["copy"]["duplicates"][0]["duplicate_of_product"] == "orig"


def test_each_permanent_error_code(deployment: Deployment, sample_photos, tmp_path: Path, engine) -> None:  # noqa: ANN001
    t = tenant()
    path, cat = sample_photos[4]
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    textfile = tmp_path / "notes.jpg"
    textfile.write_text("not an image at all")
    cases = {
        "url_not_allowed": event(t, "gopher", path, cat) | {},
        "image_fetch_failed": event(t, "missing", tmp_path / "nope.jpg", cat),
        "image_rejected": event(t, "empty", empty, cat),
        "image_rejected_text": event(t, "text", textfile, cat),
        "unsupported_category": event(t, "cat", path, "spaceship"),
    }
    cases["url_not_allowed"]["product"]["images"][0]["url"] = "gopher://127.0.0.1:70/x"
    ids = {name: deployment.publish(p) for name, p in cases.items()}
    invalid = event(t, "bad", path, cat)
    del invalid["product"]["category"]
    ids["invalid_event"] = deployment.publish(invalid)
    pickled_id = uuid.uuid4()
    deployment.publish_raw(pickle.dumps({"event_id": str(pickled_id)}), "product.created",
                           content_type="application/x-python-serialize")
    rows = deployment.wait_finished(ids.values())
    codes = {name: rows[eid].error_code for name, eid in ids.items() if name != "invalid_event"}
    assert codes == {"url_not_allowed": "url_not_allowed", "image_fetch_failed": "image_fetch_failed",
                     "image_rejected": "image_rejected", "image_rejected_text": "image_rejected",
                     "unsupported_category": "unsupported_category"}
    assert rows[ids["invalid_event"]].inbox == "rejected"
    failed = {m["causation_id"]: m for m in deployment.drain_listing_events() if m["event_type"] == "listing.failed"}
    assert failed[str(ids["invalid_event"])]["code"] == "invalid_event"
    assert "category" in failed[str(ids["invalid_event"])]["detail"]
    assert all(failed[str(eid)]["retryable"] is False for eid in ids.values())
    pickled = [m for m in failed.values() if "content type" in m["detail"]]
    assert pickled and pickled[0]["code"] == "invalid_event"  # refused without being unpickled
    with engine.connect() as conn:  # invalid events are dead-lettered by the broker, never retried
        assert conn.execute(text("SELECT count(*) FROM listings WHERE tenant_id=:t"), {"t": t}).scalar() == 0
