"""A listing is copied only when every input that decides it is the same (issue: reuse copied another
listing wholesale, merchant attributes included, whatever the new version's text or category)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from db.repositories import listings
from tasks.pipeline.reuse import reuse_key
from tests.conftest import in_tenant
from tests.db.catalog_rows import add_embeddings, add_listings, add_model_version, add_products, add_tenant, unit_rows

INPUTS = dict(category="dress", title="Red midi dress", description="Cotton, knee length.",
              attributes={"brand": "Acme", "size": "M"}, locale="en")


def test_the_key_changes_with_every_input_that_decides_the_listing() -> None:
    same = reuse_key(**INPUTS)
    assert same is not None and same == reuse_key(**{**INPUTS, "attributes": {"size": "M", "brand": "Acme"}})
    changed = [{"title": "Blue midi dress"}, {"description": "Linen."}, {"attributes": {"brand": "Other", "size": "M"}},
               {"category": "skirt"}, {"locale": "de"}]
    keys = {reuse_key(**{**INPUTS, **change}) for change in changed}
    assert same not in keys and len(keys) == len(changed)
    assert reuse_key(**{**INPUTS, "category": "dresses"}) == same  # an alias of the same schema
    assert reuse_key(**{**INPUTS, "category": "spaceship"}, unknown_category="reject") is None


@pytest.fixture
def listed(db_session: Session) -> tuple[int, int, dict[str, int]]:
    """One listing of image X by the active versions, made from INPUTS; (listing id, image id, model ids)."""
    s = db_session
    ids = {"detector": add_model_version(s, "detector", "reuse-det"), "vlm": add_model_version(s, "vlm", "reuse-vlm"),
           "clip": add_model_version(s, "clip", "reuse-clip", dims=8)}
    add_tenant(s, "reuse")
    (pid,) = add_products(s, "reuse", ["r1"], ["dress"])
    (lid,) = add_listings(s, "reuse", [pid], ["dress"], vlm_id=ids["vlm"])
    add_embeddings(s, "reuse", [pid], [lid], ["dress"], unit_rows(np.random.default_rng(1), 1, 8), clip_id=ids["clip"])
    s.execute(text("UPDATE listings SET model_versions = CAST(:mv AS jsonb), model_input = CAST(:mi AS jsonb) "
                   "WHERE id = :id"),
              {"id": lid, "mv": json.dumps(ids), "mi": json.dumps({"reuse_key": reuse_key(**INPUTS)})})
    image_id = s.execute(text("SELECT image_id FROM listings WHERE id = :id"), {"id": lid}).scalar_one()
    return lid, image_id, ids


def _reusable(s: Session, image_id: int, ids: dict[str, int], **change: object) -> int | None:
    key = reuse_key(**{**INPUTS, **change})
    assert key is not None
    with in_tenant(s, "reuse"):  # as the fetch stage runs it: enrich_worker in the job's tenant
        return listings.reusable(s, "reuse", image_id, ids, reuse_key=key)


def test_a_true_relisting_reuses_and_anything_else_does_not(db_session: Session, listed) -> None:  # noqa: ANN001
    lid, image_id, ids = listed
    assert _reusable(db_session, image_id, ids) == lid
    assert _reusable(db_session, image_id, ids, title="A new title from product.updated") is None
    assert _reusable(db_session, image_id, ids, attributes={"brand": "Another merchant's brand"}) is None
    assert _reusable(db_session, image_id, ids, category="skirt") is None  # another schema


def test_a_rejected_listing_is_never_copied_back(db_session: Session, listed) -> None:  # noqa: ANN001
    lid, image_id, ids = listed
    db_session.execute(text("UPDATE listings SET status = 'rejected' WHERE id = :id"), {"id": lid})
    assert _reusable(db_session, image_id, ids) is None


def test_listings_from_before_the_key_are_not_reused(db_session: Session, listed) -> None:  # noqa: ANN001
    lid, image_id, ids = listed
    db_session.execute(text("UPDATE listings SET model_input = '{}'::jsonb WHERE id = :id"), {"id": lid})
    assert _reusable(db_session, image_id, ids) is None
