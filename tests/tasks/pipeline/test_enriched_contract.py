"""``listing.enriched`` carries the truth flags (contract v2) from the model result to the event,
and the version-1 shape stays available for consumers that validate strictly against it."""

from __future__ import annotations

import uuid

import pytest

from db.tables import EnrichmentJob, Listing, Product
from tasks.events import InvalidEvent, contract, validate
from tasks.pipeline.persist import enriched_event, truth_flags

FLAGS = {"forced_fields": ["description", "attributes.color"], "forced_tokens": 7,
         "conflicts": [{"attribute": "color", "merchant_value": "red", "image_value": "blue", "confidence": 0.91}],
         "text_checks": {"retried": True, "repaired": ["title"], "found": [{"kind": "contact", "phrase": "www.x.com"}],
                         "remaining": []}}


def _objects(flags: dict) -> tuple[EnrichmentJob, Product, Listing]:  # noqa: ANN001
    work = {"image_ids": [1], "primary_image_id": 1, "primary_uri": "file:///x", "duplicates": []}
    job = EnrichmentJob(event_id=uuid.uuid4(), tenant_id="t1", product_version=3, work=work)
    product = Product(merchant_id="m1", external_id="sku-1")
    listing = Listing(id=11, category="shirt", schema_id="shirt@1", status="proposed", random_weights=True,
                      content={"title": "Blue shirt", "description": "A blue shirt, as pictured.",
                               "attributes": {"color": {"value": "red", "confidence": 1.0, "source": "merchant"}}},
                      model_versions={"detector": 1, "vlm": 2, "clip": 3}, **flags)
    return job, product, listing


NAMES = {"detector": "d@1", "vlm": "v@1", "clip": "c@1"}
GROUNDING = {"box": [0, 0, 5, 5], "score": 0.5, "fallback": False, "prompt": "a photo of a shirt"}


def test_v2_event_carries_the_flags_the_model_result_had() -> None:
    job, product, listing = _objects(truth_flags(FLAGS))
    event = enriched_event(job, product, listing, GROUNDING, NAMES)
    validate(event, "listing.enriched")
    assert event["schema_version"] == 2
    body = event["listing"]
    assert body["forced_fields"] == FLAGS["forced_fields"] and body["forced_tokens"] == 7
    assert body["conflicts"] == FLAGS["conflicts"]
    assert body["text_checks"] == {"retried": True, "repaired": ["title"]}  # the details stay on the row


def test_v1_event_is_the_version_one_shape_and_v2_needs_the_flags() -> None:
    job, product, listing = _objects(truth_flags(FLAGS))
    old = enriched_event(job, product, listing, GROUNDING, NAMES, version=1)
    validate(old, "listing.enriched")  # against v1, the version it names
    assert old["schema_version"] == 1 and "forced_fields" not in old["listing"]
    old["schema_version"] = 2  # a v2 event without the flags is refused
    with pytest.raises(InvalidEvent, match="forced_fields"):
        validate(old, "listing.enriched")
    v1 = contract("listing.enriched", 1)
    assert v1["properties"]["listing"]["additionalProperties"] is False  # why v1 consumers need v1


def test_a_result_from_before_the_flags_publishes_empty_ones() -> None:
    flags = truth_flags({})
    assert flags == {"forced_fields": [], "forced_tokens": 0, "conflicts": [], "text_checks": {}}
    job, product, listing = _objects(flags)
    event = enriched_event(job, product, listing, GROUNDING, NAMES)
    validate(event, "listing.enriched")
    assert event["listing"]["text_checks"] == {"retried": False, "repaired": []}
