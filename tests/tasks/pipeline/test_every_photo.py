"""Every photo of a product is used: the model stage decodes each (up to ``max_images``), the batch
grounds and embeds each, and persist records each photo's grounding and vector beside the product
vector, which is the mean of the photos that show the product.

The stages run as production runs them (``enrich_worker`` under forced row-level security, each
in ``job_session`` on the test's connection, rolled back); the batcher runs the real batch function
on the tiny models (random weights: what the words say does not matter here, what is used does).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from db import embedding_versions as ev
from db.engine import admin_session, tenant_session
from db.tables import Embedding, Grounding, Listing, PhotoEmbedding
from models.batch import ModelItem, ModelResult
from models.config import ModelConfig
from models.factory import build_models
from models.images import ImageLimits
from tasks.events import parse_product_event, product_event_payload
from tasks.io.blobs import LocalBlobStore
from tasks.pipeline.fetch import fetch_and_dedup
from tasks.pipeline.intake import accept_product_event
from tasks.pipeline.model import model_stage
from tasks.pipeline.persist import persist
from tasks.pipeline.serving import ModelServer
from tasks.runtime import Runtime
from tests.conftest import ADMIN_ROLE, WORKER_ROLE, as_role
from workers.cli.embeddings import ModelEmbedder
from tests.db.catalog_rows import add_model_version, add_tenant
from tests.tasks.pipeline.test_superseded import FakeFetcher

TENANT = "photos"
URLS = [f"https://img.example/p{n}.jpg" for n in range(5)]


class TinyBatcher:
    """The GPU worker's micro-batcher minus the thread: the real model server (registry versions,
    stage-level reuse lookup) running the real batch function on the tiny models."""

    def __init__(self, server: ModelServer) -> None:
        self.server, self.items, self.results = server, [], []

    def run(self, item: ModelItem, timeout: float | None = None) -> ModelResult:
        self.items.append(item)
        [result] = self.server.run_batch([item])
        self.results.append(result)
        return result


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None):  # noqa: ANN201
    return build_models(ModelConfig(profile="tiny", device="cpu", cache_dir=tmp_path_factory.mktemp("cache"),
                                    max_new_tokens=32))


@pytest.fixture
def env(db_session: Session, tmp_path: Path, sample_photos: list[tuple[Path, str]], bundle) -> Iterator[SimpleNamespace]:  # noqa: ANN001
    model_ids = {kind: add_model_version(db_session, kind, f"{kind}-photos", dims=512 if kind == "clip" else None)
                 for kind in ("detector", "vlm", "clip")}
    add_tenant(db_session, TENANT)
    photos = {url: sample_photos[n][0].read_bytes() for n, url in enumerate(URLS)}
    factory: sessionmaker[Session] = sessionmaker(bind=db_session.connection(), join_transaction_mode="create_savepoint",
                                                  expire_on_commit=False)
    runtime = Runtime(session_factory=factory, blobs=LocalBlobStore(tmp_path / "blobs"),  # type: ignore[arg-type]
                      fetcher=FakeFetcher(photos), publisher=None, image_limits=ImageLimits(),  # type: ignore[arg-type]
                      models_factory=None, heartbeat_s=0, max_images=4)  # type: ignore[arg-type]
    server = ModelServer(factory, ModelConfig(profile="tiny", device="cpu"), lambda config: bundle)
    runtime._batcher = TinyBatcher(server)  # type: ignore[assignment]
    with as_role(db_session, WORKER_ROLE):
        yield SimpleNamespace(runtime=runtime, factory=factory, batcher=runtime._batcher, model_ids=model_ids)


def _enrich(env: SimpleNamespace, external_id: str, urls: list[str], *, version: int = 1, title: str = "Shirt") -> int:
    payload = product_event_payload(event_type="product.created" if version == 1 else "product.updated",
                                    tenant_id=TENANT, merchant_id="m1", external_id=external_id, version=version,
                                    category="shirt", image_urls=urls, title=title, description="", attributes={})
    event = parse_product_event(json.dumps(payload).encode(), "application/json", payload["event_type"])
    with tenant_session(env.factory, TENANT) as session:
        job_id = accept_product_event(session, event).job_id
    assert job_id is not None
    assert fetch_and_dedup(env.runtime, job_id, f"fetch-{job_id}").next_stage is not None
    assert model_stage(env.runtime, job_id, f"model-{job_id}") is True
    listing_id = persist(env.runtime, job_id, f"persist-{job_id}")
    assert listing_id is not None
    return listing_id


def test_a_product_with_four_photos_uses_all_four(env: SimpleNamespace) -> None:
    listing_id = _enrich(env, "sku-4", URLS[:4])
    [item] = env.batcher.items
    assert len(item.extra_images) == 3 and len(item.image_ids) == 4 == len(set(item.image_ids))
    with tenant_session(env.factory, TENANT) as session:
        photos = session.query(PhotoEmbedding).filter_by(listing_id=listing_id).order_by(PhotoEmbedding.position).all()
        assert [p.position for p in photos] == [0, 1, 2, 3] and [p.image_id for p in photos] == list(item.image_ids)
        assert photos[0].on_product  # the primary photo always shows the product
        groundings = {g.id: g for g in session.query(Grounding).filter_by(tenant_id=TENANT)}
        assert all(p.grounding_id in groundings for p in photos)  # each photo grounded
        assert {groundings[p.grounding_id].image_id for p in photos} == set(item.image_ids)
        listing = session.get(Listing, listing_id)
        assert listing is not None and groundings[photos[0].grounding_id].id == listing.grounding_id
        [product] = session.query(Embedding).filter_by(listing_id=listing_id).all()
        voting = np.stack([np.asarray(p.embedding, dtype=np.float64) for p in photos if p.on_product])
        expected = voting.mean(axis=0) / np.linalg.norm(voting.mean(axis=0))
        assert np.allclose(np.asarray(product.image_embedding, dtype=np.float64), expected, atol=1e-5)
        assert all(p.dims == 512 and abs(np.linalg.norm(np.asarray(p.embedding)) - 1) < 1e-4 for p in photos)


def test_a_backfill_recomputes_every_photo_and_the_product_vector_the_pipeline_stored(
        env: SimpleNamespace, bundle, db_session: Session) -> None:  # noqa: ANN001
    """Blue/green seam: a new clip version backfilled beside the one the pipeline used must give
    the same vectors when it is the same model (here: the same tiny weights under another revision),
    for each photo and for the product (the mean of the photos recorded as showing it), and write
    the photo rows the new version's searches and stage reuse read. As the maintenance role."""
    listing_id = _enrich(env, "sku-bf", URLS[:4])
    with as_role(db_session, ADMIN_ROLE):
        with admin_session(env.factory) as s:
            info = bundle.embedder.version()
            new_id = ev.register_version(s, ev.VersionSpec(info.name, "same-weights", 512, "tiny", True))
            [item] = [it for it in ev.pending_items(s, new_id) if it.listing_id == listing_id]
            # Recorded as the zero-shot check might have decided (random weights decide at random):
            # the third photo does not show the product, so it keeps its row but stays out of the mean.
            s.execute(text("UPDATE photo_embeddings SET on_product = (position <> 2) WHERE listing_id = :l"),
                      {"l": listing_id})
        assert [p.position for p in item.photos] == [0, 1, 2, 3]
        embed = ModelEmbedder(bundle.embedder, env.runtime.blobs.get, bundle.grounder.padding)
        report = ev.run_backfill(env.factory, new_id, embed)
        assert report.written >= 1
        assert ev.run_backfill(env.factory, new_id, embed).written == 0  # the second run converges
        with admin_session(env.factory) as s:
            rows = {(p.model_version_id, p.position): p for p in
                    s.query(PhotoEmbedding).filter_by(listing_id=listing_id)}
            products = {e.model_version_id: e for e in s.query(Embedding).filter_by(listing_id=listing_id)}
    [active] = set(products) - {new_id}  # the clip version the pipeline served
    assert sorted(pos for v, pos in rows if v == new_id) == [0, 1, 2, 3]
    for pos in range(4):
        old, new = rows[(active, pos)], rows[(new_id, pos)]
        assert (new.image_id, new.grounding_id, new.product_probability) == (old.image_id, old.grounding_id,
                                                                            old.product_probability)
        assert new.on_product == (pos != 2)
        np.testing.assert_allclose(np.asarray(new.embedding), np.asarray(old.embedding), atol=1e-5)
    # The backfill averages the three recorded as shown, whatever the new model would say of them.
    shown = np.stack([np.asarray(rows[(active, pos)].embedding, dtype=np.float64) for pos in (0, 1, 3)])
    expected = shown.mean(axis=0) / np.linalg.norm(shown.mean(axis=0))
    np.testing.assert_allclose(np.asarray(products[new_id].image_embedding), expected, atol=1e-5)
    np.testing.assert_allclose(np.asarray(products[new_id].text_embedding),
                               np.asarray(products[active].text_embedding), atol=1e-5)
    assert products[new_id].text_input == products[active].text_input


def test_a_backfill_matches_the_stored_product_vector_when_every_photo_shows_it(
        env: SimpleNamespace, bundle, db_session: Session) -> None:  # noqa: ANN001
    listing_id = _enrich(env, "sku-bf2", URLS[:3])
    with as_role(db_session, ADMIN_ROLE):
        with admin_session(env.factory) as s:
            info = bundle.embedder.version()
            new_id = ev.register_version(s, ev.VersionSpec(info.name, "same-weights-2", 512, "tiny", True))
            shown = [p.on_product for p in s.query(PhotoEmbedding).filter_by(listing_id=listing_id)]
        ev.run_backfill(env.factory, new_id, ModelEmbedder(bundle.embedder, env.runtime.blobs.get,
                                                           bundle.grounder.padding))
        with admin_session(env.factory) as s:
            products = {e.model_version_id: e for e in s.query(Embedding).filter_by(listing_id=listing_id)}
    [active] = set(products) - {new_id}
    assert len(shown) == 3
    # Whatever the zero-shot check decided, the backfill averages the same photos: the same vector.
    np.testing.assert_allclose(np.asarray(products[new_id].image_embedding),
                               np.asarray(products[active].image_embedding), atol=1e-5)


def test_photos_beyond_the_limit_are_not_read_and_a_different_photo_set_is_not_a_relisting(env: SimpleNamespace) -> None:
    first = _enrich(env, "sku-5", URLS)
    assert len(env.batcher.items[0].image_ids) == 4  # max_images: the primary and the next three
    second = _enrich(env, "sku-5b", [URLS[0], URLS[4]])  # same primary photo, other secondary photo
    assert len(env.batcher.items) == 2  # generated, not copied from the first product's listing
    with tenant_session(env.factory, TENANT) as session:
        assert session.query(PhotoEmbedding).filter_by(listing_id=first).count() == 4
        assert session.query(PhotoEmbedding).filter_by(listing_id=second).count() == 2


def test_a_photo_that_shows_a_size_chart_does_not_show_the_product(bundle) -> None:  # noqa: ANN001
    verifier = bundle.verifier
    texts = ["a size chart table", "a barcode", "a photo of a shirt"]
    vectors = bundle.embedder.embed_texts(texts)  # a picture exactly like each prompt
    shows = verifier.shows_product(vectors, ["shirt"] * 3)
    assert [on for on, _ in shows] == [False, False, True]
    assert shows[2][1] > shows[0][1]


def test_an_update_that_changes_only_the_text_reuses_every_photos_grounding_and_vector(env: SimpleNamespace) -> None:
    first = _enrich(env, "sku-u", URLS[:3])
    second = _enrich(env, "sku-u", URLS[:3], version=2, title="Shirt, new title")
    assert second != first  # a new listing for the new version: the listing model ran on the new text
    before, after = env.batcher.results
    assert before.reused == {"groundings": 0, "embeddings": 0}
    assert after.reused == {"groundings": 3, "embeddings": 3}  # no detector, no CLIP image encoding
    assert [p["grounding"] for p in after.images] == [p["grounding"] for p in before.images]
    assert np.allclose([p["embedding"] for p in after.images], [p["embedding"] for p in before.images])
    assert "Shirt, new title" in after.model_input["phases"]["text"]["prompt_text"]
    other = _enrich(env, "sku-o", [URLS[3], URLS[0]])  # a new primary photo, a known secondary one
    assert env.batcher.results[-1].reused == {"groundings": 1, "embeddings": 1}
    assert other not in (first, second)


def test_the_registry_names_of_the_models_are_read_once_per_process(env: SimpleNamespace,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Persist names the model versions in ``listing.enriched`` from the runtime's cache after the first
    listing (a version's name and revision never change): the same names the registry holds."""
    from db.repositories import model_versions
    from db.tables import OutboxMessage

    reads: list[set[int]] = []
    real = model_versions.display_names
    monkeypatch.setattr(model_versions, "display_names", lambda s, ids: reads.append(set(ids)) or real(s, ids))
    _enrich(env, "sku-a", URLS[:1])
    _enrich(env, "sku-b", URLS[1:2])
    ids = set(env.batcher.results[-1].model_versions.values())
    assert reads == [ids]  # the second listing read no names
    with tenant_session(env.factory, TENANT) as session:
        events = [r.payload for r in session.query(OutboxMessage)
                  .filter_by(tenant_id=TENANT, routing_key="listing.enriched").order_by(OutboxMessage.id)]
        registry = real(session, ids)
    assert len(events) == 2
    for event in events:
        assert {k: event["models"][k] for k in ("detector", "vlm", "clip")} == {
            kind: registry[mid] for kind, mid in env.batcher.results[-1].model_versions.items()}
