"""The enrichment policy through the real stages: an embeddings-only product is deduplicated and
embedded (whole photos, text from the merchant's own title and attributes), gets no grounding and no
VLM call, publishes ``product.indexed`` (never ``listing.enriched``), and counts as covered; the
second time (a redelivery, a reconciler re-run, a ``product.updated`` that changes the policy)
converges.

The stages run as production runs them (``enrich_worker`` under forced RLS, on the test's
connection, rolled back); the batch is the real batch function on the tiny models (random weights:
what the vectors mean does not matter here, which models ran does).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from sqlalchemy.orm import Session, sessionmaker

from db.engine import system_session, tenant_session
from db.tables import Embedding, EnrichmentJob, Grounding, Listing, OutboxMessage, PhotoEmbedding
from models.batch import ModelItem, run_model_batch
from models.config import ModelConfig
from models.factory import build_models
from models.images import ImageLimits, decode_image
from tasks.events import InvalidEvent, parse_product_event, product_event_payload, validate
from tasks.io.blobs import LocalBlobStore
from tasks.pipeline.fetch import fetch_and_dedup
from tasks.pipeline.intake import accept_product_event
from tasks.pipeline.model import model_stage
from tasks.pipeline.persist import persist
from tasks.pipeline.policy import ALL_STAGES, InvalidPolicy, PolicyTable, check_stages
from tasks.pipeline.reconcile import find_incomplete_products, requeue
from tasks.pipeline.serving import ModelServer
from tasks.runtime import Runtime
from tests.conftest import WORKER_ROLE, as_role
from tests.db.catalog_rows import add_model_version, add_tenant
from tests.tasks.pipeline.test_every_photo import TinyBatcher
from tests.tasks.pipeline.test_superseded import FakeFetcher
from workers.settings import Settings

LITE, FULL = "lite", "full"  # tenants: embeddings-only by setting, and the default (every stage)
URLS = [f"https://img.example/q{n}.jpg" for n in range(3)]
EMBEDDINGS_ONLY = ["dedup", "embeddings"]


class Counting:
    """Delegates to a real model wrapper and counts the calls of the named methods."""

    def __init__(self, wrapped: Any, *methods: str) -> None:
        self._wrapped, self.calls = wrapped, {m: 0 for m in methods}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._wrapped, name)
        if name not in self.calls:
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return attr(*args, **kwargs)
        return counted


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None):  # noqa: ANN201
    b = build_models(ModelConfig(profile="tiny", device="cpu", cache_dir=tmp_path_factory.mktemp("cache"),
                                 max_new_tokens=32))
    b._grounder = Counting(b.grounder, "predict")  # the real wrappers, behind a call counter
    b._generator = Counting(b.generator, "describe_attributes", "write_text")
    return b


def _model_calls(bundle: Any) -> dict[str, int]:
    return {**bundle.grounder.calls, **bundle.generator.calls}


@pytest.fixture
def env(db_session: Session, tmp_path: Path, sample_photos: list[tuple[Path, str]], bundle) -> Iterator[SimpleNamespace]:  # noqa: ANN001
    # No registry rows seeded: the model server registers and activates the tiny bundle's own versions
    # (a first deployment), so what it stamps is what the coverage view calls active.
    for tenant in (LITE, FULL):
        add_tenant(db_session, tenant)
    photos = {url: sample_photos[n][0].read_bytes() for n, url in enumerate(URLS)}
    factory: sessionmaker[Session] = sessionmaker(bind=db_session.connection(), join_transaction_mode="create_savepoint",
                                                  expire_on_commit=False)
    runtime = Runtime(session_factory=factory, blobs=LocalBlobStore(tmp_path / "blobs"),  # type: ignore[arg-type]
                      fetcher=FakeFetcher(photos), publisher=None, image_limits=ImageLimits(),  # type: ignore[arg-type]
                      models_factory=None, heartbeat_s=0, max_images=4,  # type: ignore[arg-type]
                      enrichment=Settings(enrichment={"tenants": {LITE: EMBEDDINGS_ONLY}}).enrichment.table())
    server = ModelServer(factory, ModelConfig(profile="tiny", device="cpu"), lambda config: bundle)
    runtime._batcher = TinyBatcher(server)  # type: ignore[assignment]
    for counter in (bundle.grounder.calls, bundle.generator.calls):
        counter.update({k: 0 for k in counter})
    with as_role(db_session, WORKER_ROLE):
        yield SimpleNamespace(runtime=runtime, factory=factory, batcher=runtime._batcher,
                              bundle=bundle, db=db_session)


def _accept(env: SimpleNamespace, tenant: str, external_id: str, urls: list[str], *, version: int = 1,
            stages: list[str] | None = None, attributes: dict[str, Any] | None = None) -> int:
    payload = product_event_payload(event_type="product.created" if version == 1 else "product.updated",
                                    tenant_id=tenant, merchant_id="m1", external_id=external_id, version=version,
                                    category="shirt", image_urls=urls, title="Blue linen shirt", description="",
                                    attributes=attributes or {"color": "blue", "material": "linen"}, stages=stages)
    event = parse_product_event(json.dumps(payload).encode(), "application/json", payload["event_type"])
    with tenant_session(env.factory, tenant) as session:
        job_id = accept_product_event(session, event).job_id
    assert job_id is not None
    return job_id


def _run(env: SimpleNamespace, job_id: int) -> int:
    assert fetch_and_dedup(env.runtime, job_id, f"fetch-{job_id}").next_stage is not None
    assert model_stage(env.runtime, job_id, f"model-{job_id}") is True
    listing_id = persist(env.runtime, job_id, f"persist-{job_id}")
    assert listing_id is not None
    return listing_id


def _served(env: SimpleNamespace) -> dict[str, int]:
    """The registry ids the model server stamped (it registers the tiny bundle's own versions)."""
    return env.batcher.results[-1].model_versions


def _events(env: SimpleNamespace, tenant: str) -> list[dict[str, Any]]:
    """The domain events in the outbox (not the stage hand-offs, ``task:catalog.*``)."""
    with tenant_session(env.factory, tenant) as session:
        return [r.payload for r in session.query(OutboxMessage).filter_by(tenant_id=tenant).order_by(OutboxMessage.id)
                if not r.routing_key.startswith("task:")]


def test_an_embeddings_only_tenant_gets_vectors_and_no_grounding_or_listing_work(env: SimpleNamespace) -> None:
    listing_id = _run(env, _accept(env, LITE, "sku-1", URLS[:2]))
    assert _model_calls(env.bundle) == {"predict": 0, "describe_attributes": 0, "write_text": 0}
    [item], [result] = env.batcher.items, env.batcher.results
    assert item.stages == frozenset(EMBEDDINGS_ONLY) and result.stages == EMBEDDINGS_ONLY
    assert set(result.timings_ms) == {"ground", "embed"} and result.grounding == {}
    with tenant_session(env.factory, LITE) as session:
        record = session.get(Listing, listing_id)
        assert record is not None and record.model_version_id == _served(env)["clip"]
        assert record.model_versions == {"clip": _served(env)["clip"], "policy": "dedup+embeddings"}
        assert record.model_output == {} and record.grounding_id is None
        assert record.content["title"] == "Blue linen shirt"  # the merchant's own words, nothing generated
        assert record.content["attributes"]["color"] == {"value": "blue", "confidence": 1.0, "source": "merchant"}
        [product] = session.query(Embedding).filter_by(listing_id=listing_id).all()
        assert product.text_input == "Blue linen shirt, color blue, material linen"
        photos = session.query(PhotoEmbedding).filter_by(listing_id=listing_id).order_by(PhotoEmbedding.position).all()
        assert [p.position for p in photos] == [0, 1] and all(p.grounding_id is None and p.on_product for p in photos)
        # whole photos embedded: the primary's vector is CLIP of the uncropped photo
        whole = env.bundle.embedder.embed_images([decode_image(env.runtime.fetcher.photos[URLS[0]]).image])[0]
        assert np.allclose(np.asarray(photos[0].embedding), whole, atol=1e-5)
        mean = np.mean([np.asarray(p.embedding) for p in photos], axis=0)
        assert np.allclose(np.asarray(product.image_embedding), mean / np.linalg.norm(mean), atol=1e-5)
        assert session.query(Grounding).filter_by(tenant_id=LITE).count() == 0
        job = session.query(EnrichmentJob).filter_by(listing_id=listing_id).one()
        assert job.status == "done"
    [event] = _events(env, LITE)
    assert event["event_type"] == "product.indexed" and event["listing_id"] == listing_id
    assert event["policy"] == {"name": "dedup+embeddings", "stages": EMBEDDINGS_ONLY}
    assert event["grounding"] is None and event["photos"] == 2 and event["models"]["detector"] is None
    validate(event, "product.indexed")


def test_the_event_hint_narrows_the_default_and_never_widens_a_tenant_setting(env: SimpleNamespace) -> None:
    _run(env, _accept(env, FULL, "sku-h", URLS[:1], stages=EMBEDDINGS_ONLY))
    _run(env, _accept(env, LITE, "sku-w", URLS[1:2], stages=sorted(ALL_STAGES)))
    assert [i.stages for i in env.batcher.items] == [frozenset(EMBEDDINGS_ONLY)] * 2
    assert _model_calls(env.bundle)["describe_attributes"] == 0
    assert [e["event_type"] for e in _events(env, FULL) + _events(env, LITE)] == ["product.indexed"] * 2


def test_the_second_time_converges_and_an_update_can_change_the_policy(env: SimpleNamespace) -> None:
    job_id = _accept(env, FULL, "sku-2", URLS[:1], stages=EMBEDDINGS_ONLY)
    first = _run(env, job_id)
    assert persist(env.runtime, job_id, f"persist-{job_id}") is None  # redelivered persist: job already done
    with system_session(env.factory) as session:
        assert [p.external_id for p in find_incomplete_products(session)] == []  # covered: nothing to re-run
        # a reconciler re-run (e.g. a lost persist) keeps the hint, writes nothing twice, announces nothing again
        [previous] = session.query(EnrichmentJob).filter_by(id=job_id).all()
        from tasks.pipeline.reconcile import IncompleteProduct, Reason

        again = requeue(session, IncompleteProduct(FULL, previous.product_id, "sku-2", 1, Reason.missing_embedding,
                                                   job_id, None))
    assert again is not None
    assert _run(env, again.job_id) == first
    assert env.batcher.items[-1].stages == frozenset(EMBEDDINGS_ONLY)
    assert [e["event_type"] for e in _events(env, FULL)] == ["product.indexed"]
    # version 2 without the hint: the default policy (every stage) runs, a listing is generated beside it
    second = _run(env, _accept(env, FULL, "sku-2", URLS[:1], version=2))
    assert second != first and _model_calls(env.bundle)["describe_attributes"] == 1
    with tenant_session(env.factory, FULL) as session:
        listing = session.get(Listing, second)
        assert listing is not None and listing.model_version_id == _served(env)["vlm"]
    assert [e["event_type"] for e in _events(env, FULL)] == ["product.indexed", "listing.enriched"]


def test_grounding_without_a_listing_embeds_the_grounded_crops(env: SimpleNamespace) -> None:
    listing_id = _run(env, _accept(env, FULL, "sku-g", URLS[:2], stages=["dedup", "grounding", "embeddings"]))
    assert _model_calls(env.bundle) == {"predict": 1, "describe_attributes": 0, "write_text": 0}
    with tenant_session(env.factory, FULL) as session:
        record = session.get(Listing, listing_id)
        assert record is not None and record.grounding_id is not None
        assert record.model_versions["detector"] == _served(env)["detector"]
        photos = session.query(PhotoEmbedding).filter_by(listing_id=listing_id).all()
        assert len(photos) == 2 and all(p.grounding_id is not None for p in photos)
    [event] = _events(env, FULL)
    assert event["grounding"]["prompt"] and "owlv2" in event["models"]["detector"]


def test_a_mixed_batch_keeps_order_and_runs_the_listing_model_only_for_its_own_items(bundle) -> None:  # noqa: ANN001
    from PIL import Image

    image = Image.new("RGB", (64, 64), (200, 30, 30))
    items = [ModelItem(job_id=n, image=image, category="shirt", title=f"t{n}", description="", attributes={},
                       locale="en", stages=frozenset(EMBEDDINGS_ONLY) if n % 2 else None) for n in range(4)]
    before = dict(bundle.generator.calls)
    results = run_model_batch(bundle, items)
    assert [r.job_id for r in results] == [0, 1, 2, 3] and all(r.error is None for r in results)
    assert [bool(r.content.get("attributes") is not None and r.model_output) for r in results] == [True, False] * 2
    assert bundle.generator.calls["describe_attributes"] == before["describe_attributes"] + 1


def test_bad_policies_are_refused_with_the_rule_they_break() -> None:
    with pytest.raises(InvalidPolicy, match="always run"):
        check_stages(["embeddings"])
    with pytest.raises(InvalidPolicy, match="go together"):
        check_stages(["dedup", "grounding", "listing", "embeddings"])
    with pytest.raises(InvalidPolicy, match="needs 'grounding'"):
        check_stages(["dedup", "listing", "verification", "embeddings"])
    with pytest.raises(ValueError, match="ENRICH_ENRICHMENT__"):
        Settings(enrichment={"categories": {"socks": ["dedup", "captions"]}})
    payload = product_event_payload(tenant_id="t", merchant_id="m", external_id="x", version=1, category="shirt",
                                    image_urls=["https://img.example/a.jpg"])
    payload["hints"] = {"stages": ["dedup", "listing", "verification", "embeddings"]}  # schema-valid, rule-invalid
    with pytest.raises(InvalidEvent, match=r"\$\.hints\.stages: 'listing' needs 'grounding'"):
        parse_product_event(json.dumps(payload).encode(), "application/json", "product.created")
    payload["hints"] = {"stages": ["dedup", "embeddings", "captions"]}
    with pytest.raises(InvalidEvent, match=r"\$\.hints\.stages"):
        parse_product_event(json.dumps(payload).encode(), "application/json", "product.created")


def test_precedence_tenant_category_then_tenant_then_category() -> None:
    table = PolicyTable.of(by_tenant={"a": EMBEDDINGS_ONLY}, by_category={"socks": ["dedup", "grounding", "embeddings"]},
                           by_tenant_category={"a/dress": sorted(ALL_STAGES)})
    assert table.resolve("a", "dress") == ALL_STAGES
    assert table.resolve("a", "socks") == frozenset(EMBEDDINGS_ONLY)
    assert table.resolve("b", "socks") == frozenset({"dedup", "grounding", "embeddings"})
    assert table.resolve("b", "shirt") == ALL_STAGES
    assert table.resolve("b", "socks", EMBEDDINGS_ONLY) == frozenset(EMBEDDINGS_ONLY)
    with pytest.raises(InvalidPolicy, match="TENANT/CATEGORY"):
        PolicyTable.of(by_tenant_category={"nocategory": EMBEDDINGS_ONLY})


def test_events_without_hints_are_unchanged() -> None:
    """Backward compatible: an event as publishers sent it before hints existed is valid, and parses
    to no hint (whatever is configured applies)."""
    payload = product_event_payload(tenant_id="t", merchant_id="m", external_id="x", version=1, category="shirt",
                                    image_urls=["https://img.example/a.jpg"])
    assert "hints" not in payload
    assert parse_product_event(json.dumps(payload).encode(), "application/json", "product.created").stages_hint is None


def test_the_coverage_view_counts_only_a_policy_record_of_the_active_clip(env: SimpleNamespace) -> None:
    _run(env, _accept(env, LITE, "sku-c", URLS[:1]))
    with system_session(env.factory) as session:
        assert find_incomplete_products(session) == []
    with as_role(env.db, None):  # seeding the registry needs the owner (the runtime role cannot write it)
        add_model_version(env.db, "clip", "clip-policy-2", dims=512)  # a new clip version: not covered any more
    with system_session(env.factory) as session:
        assert [(p.external_id, p.reason.value) for p in find_incomplete_products(session)] == [
            ("sku-c", "missing_listing")]


def test_a_generated_listing_is_copied_only_to_a_product_whose_policy_generates_one(env: SimpleNamespace) -> None:
    """Reuse copies a generated listing (same photo, same inputs, same models). A product whose
    policy generates none must get its own policy's record, not a copy of someone else's listing."""
    from tasks.pipeline.jobs import Stage

    full = _run(env, _accept(env, FULL, "sku-r1", URLS[2:3]))
    lite_job = _accept(env, FULL, "sku-r2", URLS[2:3], stages=EMBEDDINGS_ONLY)
    assert fetch_and_dedup(env.runtime, lite_job, f"fetch-{lite_job}").next_stage == Stage.model  # not persist
    assert model_stage(env.runtime, lite_job, f"model-{lite_job}") is True
    lite = persist(env.runtime, lite_job, f"persist-{lite_job}")
    assert env.batcher.items[-1].stages == frozenset(EMBEDDINGS_ONLY)
    with tenant_session(env.factory, FULL) as session:
        record = session.get(Listing, lite)
        assert record is not None and record.model_versions.get("policy") == "dedup+embeddings"
        assert "reused_from_listing_id" not in record.model_versions
    # The same inputs under the full policy still copy the first listing: no model work.
    copy_job = _accept(env, FULL, "sku-r3", URLS[2:3])
    assert fetch_and_dedup(env.runtime, copy_job, f"fetch-{copy_job}").next_stage == Stage.persist
    copy = persist(env.runtime, copy_job, f"persist-{copy_job}")
    with tenant_session(env.factory, FULL) as session:
        listing = session.get(Listing, copy)
        assert listing is not None and listing.model_versions["reused_from_listing_id"] == full
    assert [e["event_type"] for e in _events(env, FULL)] == ["listing.enriched", "product.indexed", "listing.enriched"]
