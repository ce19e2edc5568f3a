"""The embeddings-only policy end to end: product events with ``hints.stages`` through RabbitMQ to the
real workers (events+cpu, gpu; tiny models), vectors in Postgres, ``product.indexed`` on the
backend's queue; a redelivery changes nothing, and a ``product.updated`` without the hint gets a
generated listing (the default policy) beside the vectors-only record."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from sqlalchemy import text

from tasks.events import product_event_payload, validate
from tests.integration.conftest import tenant
from tests.integration.harness import Deployment

pytestmark = pytest.mark.integration
EMBEDDINGS_ONLY = ["dedup", "embeddings"]


def event(t: str, ext: str, photo: Path, category: str, *, version: int = 1, stages: list[str] | None = None) -> dict:
    return product_event_payload(event_type="product.created" if version == 1 else "product.updated", tenant_id=t,
                                 merchant_id="m1", external_id=ext, version=version, category=category,
                                 image_urls=[photo.as_uri()], title=f"{category} {ext}", attributes={"brand": "Acme"},
                                 stages=stages)


def test_embeddings_only_products_through_the_broker(deployment: Deployment, sample_photos, engine) -> None:  # noqa: ANN001
    t = tenant()
    (a, cat_a), (b, cat_b) = sample_photos[0], sample_photos[3]
    first = [event(t, "e1", a, cat_a, stages=EMBEDDINGS_ONLY), event(t, "e2", b, cat_b, stages=EMBEDDINGS_ONLY),
             event(t, "e3", a, cat_a, stages=EMBEDDINGS_ONLY)]  # e3: the same photo as e1, an exact duplicate
    ids = [deployment.publish(p) for p in first]
    rows = deployment.wait_finished(ids)
    assert {r.status for r in rows.values()} == {"done"}, [(r.status, r.error_code) for r in rows.values()]
    out = [m for m in deployment.drain_listing_events() if m.get("tenant_id") == t]
    assert sorted(m["event_type"] for m in out) == ["product.indexed"] * 3
    assert {uuid.UUID(m["causation_id"]) for m in out} == set(ids)
    for m in out:
        validate(m, "product.indexed")
        assert m["policy"]["name"] == "dedup+embeddings" and m["models"]["random_weights"] is True
    by_product = {m["product"]["external_id"]: m for m in out}
    assert by_product["e3"]["duplicates"][0]["kind"] == "exact"
    with engine.connect() as conn:
        records = conn.execute(text(
            "SELECT l.model_versions ->> 'policy' AS policy, l.model_output, l.grounding_id, "
            "       (SELECT count(*) FROM photo_embeddings pe WHERE pe.listing_id = l.id) AS photos,"
            "       (SELECT count(*) FROM embeddings e WHERE e.listing_id = l.id) AS vectors"
            "  FROM listings l WHERE l.tenant_id = :t"), {"t": t}).all()
        groundings = conn.execute(text("SELECT count(*) FROM groundings WHERE tenant_id = :t"), {"t": t}).scalar_one()
    assert len(records) == 3 and groundings == 0  # no detector ran for this tenant
    assert all(r.policy == "dedup+embeddings" and r.model_output == {} and r.grounding_id is None
               and r.photos == 1 and r.vectors == 1 for r in records)

    deployment.publish(first[0])  # redelivered by the backend: a no-op
    update = event(t, "e1", a, cat_a, version=2)  # no hint: the default policy, a generated listing
    deployment.wait_finished([deployment.publish(update)])
    deployment.wait_finished([uuid.UUID(first[0]["event_id"])])
    later = [m for m in deployment.drain_listing_events() if m.get("tenant_id") == t]
    assert [m["event_type"] for m in later] == ["listing.enriched"]
    assert later[0]["product"] == {"external_id": "e1", "version": 2}
