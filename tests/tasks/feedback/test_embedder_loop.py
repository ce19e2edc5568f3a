"""The embedder loop end to end on the tiny profile, through the model lifecycle:

listings accepted/edited (the review intake: ``enrich_worker`` in the event's tenant, forced RLS)
→ embedder dataset (the beat builder: ``enrich_worker``, sets its own system scope) → contrastive
fine-tune of the active clip → candidate with base and candidate held-out metrics (``enrich_admin``,
as ``enrich retrain embedder`` runs) → the gate → backfill → compare → activate (``enrich_admin``)
→ searches (``enrich_reader`` in a tenant) read the new version's vectors.

A database of its own: the loop activates a clip version, which every other suite would then see.
Tiny random weights: the metrics show the plumbing, not quality (``infra/bench/bench_embedder_training.py``
measures learning on real photos).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from db import embedding_versions as ev
from db import similarity
from db.engine import make_engine
from db.tables import ModelVersion
from models.config import ModelConfig
from models.embedder_training import ContrastiveConfig
from models.embeddings import ClipEmbedder
from models.images import decode_image
from tasks.feedback.datasets import read_manifest, read_split
from tasks.feedback.embedder_data import EmbedderDataConfig, build_embedder_dataset
from tasks.feedback.embedder_finetune import finetune_candidate, pipeline_crop
from tasks.feedback.embedder_rollout import RolloutRefused, check_approved, roll_out
from tasks.feedback.pairs import BuildStatus, holdout_split
from tasks.feedback.promotion import promote
from tasks.feedback.reviews import apply_review, parse_review_event, review_event_payload
from tasks.io.blobs import LocalBlobStore
from tests.conftest import ADMIN_ROLE, READER_ROLE, WORKER_ROLE, fresh_database, in_scope, in_tenant
from tests.tasks.feedback.test_reviews import add_listing
from workers.cli.embeddings import ModelEmbedder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TENANTS = ("loop-a", "loop-b")
HOLDOUT = 0.4
DATA = EmbedderDataConfig(settle=timedelta(0), holdout_fraction=HOLDOUT)
COLORS = ("red", "blue", "black")
CROP_PADDING = ModelConfig().crop_padding  # what the pipeline, the fine-tune and the backfill cut with


@pytest.fixture(scope="module")
def engines(pg_url: str) -> Iterator[dict[str, Any]]:
    url = fresh_database(pg_url, "suite_embedder_loop")
    engs = {"owner": make_engine(url), "worker": make_engine(url, runtime_role=WORKER_ROLE),
            "admin": make_engine(url, runtime_role=ADMIN_ROLE)}
    yield engs
    for e in engs.values():
        e.dispose()


def _review(owner: sessionmaker[Session], tenant: str, listing_id: int, decision: str,
            corrected: dict[str, Any] | None = None) -> None:
    payload = review_event_payload(tenant_id=tenant, merchant_id="m1", listing_id=listing_id, decision=decision,
                                   corrected=corrected)
    with owner() as s, s.begin(), in_tenant(s, tenant):  # the review intake's tenant transaction
        apply_review(s, parse_review_event(json.dumps(payload).encode(), "application/json"))


def test_catalog_teaches_the_embedder(engines: dict[str, Any], sample_photos: list[tuple[Path, str]],
                                      tmp_path: Path) -> None:  # noqa: PLR0915 - one loop, many steps
    owner = sessionmaker(engines["owner"], expire_on_commit=False)
    admin = sessionmaker(engines["admin"], expire_on_commit=False)
    originals, datasets = LocalBlobStore(tmp_path / "originals"), LocalBlobStore(tmp_path / "datasets")
    store = LocalBlobStore(tmp_path / "model-store")
    photos = [p for p in sample_photos if p[1] in ("dress", "shoes", "pants", "hat", "t-shirt", "skirt")]

    # Seed (superuser): 12 products over two tenants, each a listing of a real photo. Product ids are
    # picked so that both photos of two categories are held out (held-out retrieval needs pairs).
    listings: list[tuple[str, str, int, str]] = []
    with owner() as s, s.begin():
        for n, (path, category) in enumerate(photos):
            tenant = TENANTS[n % 2]
            want = "holdout" if category in ("dress", "shoes") else "train"
            ext = next(e for i in range(1000) if holdout_split(tenant, e := f"p{n:02d}-{i}", HOLDOUT).value == want)
            uri = originals.put(f"originals/{tenant}/{n:02d}", path.read_bytes())
            output = {"title": f"A {category}", "description": f"A {category} for sale.",
                      "attributes": {"color": COLORS[n % 3]}}
            lid = add_listing(s, tenant, ext, category=category, model_output=output, storage_uri=uri, dropped=set())
            listings.append((tenant, ext, lid, category))

    # The base clip (tiny, random) is the active version with every listing embedded.
    base = ClipEmbedder(profile="tiny", device="cpu")
    base.load()
    embed_base = ModelEmbedder(base, originals.get, CROP_PADDING)
    with admin() as s, s.begin():
        info = base.version()
        base_id = ev.register_version(s, ev.VersionSpec(info.name, info.revision, int(info.dims), "tiny", True))
    ev.run_backfill(admin, base_id, embed_base)
    with admin() as s, s.begin():
        s.execute(text("SELECT set_config('enrich.scope', 'system', true)"))
        ev.activate(s, base_id)

    # 1. Merchants review: 8 accepted, 3 edited (the colour corrected), 1 rejected.
    for n, (tenant, _, lid, _) in enumerate(listings):
        if n < 8:
            _review(owner, tenant, lid, "accepted")
        elif n < 11:
            _review(owner, tenant, lid, "edited", {"attributes": {"color": "green"}})
        else:
            _review(owner, tenant, lid, "rejected")
    assert [c for _, _, _, c in listings][8:] == ["skirt", "skirt", "t-shirt", "t-shirt"]

    # 2. The dataset, built as beat builds it (enrich_worker; it takes its own system scope).
    with owner() as s, s.begin(), in_scope(s, WORKER_ROLE):
        built = build_embedder_dataset(s, datasets, DATA)
    assert built.status == BuildStatus.built and built.pairs == 11
    assert built.dropped == {"superseded_review": 0, "listing_rejected": 1}
    manifest = read_manifest(datasets, built.uri)
    train, held = read_split(datasets, built.uri, "train"), read_split(datasets, built.uri, "holdout")
    assert manifest["format"] == "clip-contrastive-jsonl/1" and len(train) + len(held) == 11
    for row in train + held:  # split by product, the same rule as the DPO pairs
        assert row["split"] == holdout_split(row["tenant_id"], row["external_id"], HOLDOUT).value
    assert held and len(train) >= 2
    edited = [r for r in train + held if r["decision"] == "edited"]
    assert len(edited) == 3 and all(r["attributes"]["color"] == "green" and
                                    r["attribute_sources"]["color"] == "merchant" for r in edited)
    with owner() as s, s.begin(), in_scope(s, WORKER_ROLE):  # a second run finds nothing new
        assert build_embedder_dataset(s, datasets, DATA).status == BuildStatus.empty

    # 3. Fine-tune the active clip → a candidate with held-out metrics of base and candidate.
    config = ContrastiveConfig(epochs=3, batch_size=8, lr=1e-3, warmup_steps=1, run_length=2)
    result = finetune_candidate(admin, datasets=datasets, originals=originals, embedder=base,
                                dataset_name=built.name, model_store=store, config=config)
    metrics = result.metrics
    for side in ("holdout", "base_holdout"):
        assert metrics[side]["rows"] == len(held)
        assert 0.0 <= metrics[side]["zero_shot_accuracy"] <= 1.0 and 0.0 < metrics[side]["mrr"] <= 1.0
    assert metrics["training"]["steps"] > 0 and metrics["random_weights"] is True
    assert result.weights_uri.startswith(store.uri_for("clip") + "/")
    with admin() as s:
        row = s.execute(text("SELECT kind, status, dims, weights_uri, params FROM model_versions WHERE id = :i"),
                        {"i": result.model_version_id}).one()
        assert (row.kind, row.status, row.dims, row.weights_uri) == ("clip", "candidate", 512, result.weights_uri)
        assert row.params["base"] == base.version().key and row.params["dataset"] == built.name
        check = s.get(ModelVersion, result.model_version_id)
        with pytest.raises(RolloutRefused, match="has not passed the gate"):
            check_approved(check)  # no rollout before the gate

    # 4. The gate decides (it records its decision either way).
    with admin() as s, s.begin():
        decision = promote(s, result.model_version_id, margin=0.0)
    assert decision.kind == "clip" and decision.metric == "mrr"
    assert decision.candidate == metrics["holdout"]["mrr"] and decision.active == metrics["base_holdout"]["mrr"]
    if not decision.promoted:  # random tiny weights may not improve: the refusal is explained, then overridden
        assert "does not beat the base" in decision.reasons[0]
        with admin() as s, s.begin():
            decision = promote(s, result.model_version_id, force=True, reason="tiny-profile rehearsal")
    assert decision.promoted and decision.rollout_required and decision.retired_version_id is None
    with admin() as s:
        assert s.execute(text("SELECT status FROM model_versions WHERE id = :i"),
                         {"i": result.model_version_id}).scalar_one() == "candidate"  # not active before backfill

    # 5. Rollout: backfill → compare → activate, as the maintenance role. A first attempt stops after
    # 5 rows (interrupted); promoting again keeps the recorded decision and the rollout resumes.
    candidate = ClipEmbedder(result.weights_uri, profile="pretrained", device="cpu")
    assert ev.run_backfill(admin, result.model_version_id, ModelEmbedder(candidate, originals.get, CROP_PADDING), limit=5).written == 5
    with admin() as s, s.begin():
        again = promote(s, result.model_version_id, margin=0.0)
    assert again.promoted and again.rollout_required and again.candidate == decision.candidate
    rolled = roll_out(admin, result.model_version_id, ModelEmbedder(candidate, originals.get, CROP_PADDING))
    assert rolled.written == 7 and rolled.coverage == 1.0 and rolled.retired_version_id == base_id
    assert roll_out(admin, result.model_version_id, ModelEmbedder(candidate, originals.get, CROP_PADDING)).written == 0

    # 6. Searches use the new version: a photo's vector under the candidate finds its own product first.
    tenant, ext, lid, _ = listings[0]
    image = pipeline_crop(decode_image(originals.get(originals.uri_for(f"originals/{tenant}/00"))).image, None, 0.05)
    new_vec, old_vec = candidate.embed_images([image])[0], base.embed_images([image])[0]
    assert float(np.dot(new_vec, old_vec)) < 0.99  # the weights really changed
    with owner() as s, s.begin(), in_tenant(s, tenant, READER_ROLE):
        hits = similarity.search_by_embedding(s, tenant, new_vec, k=3)
        assert hits[0].external_id == ext and hits[0].distance < 1e-3
        assert {h.external_id for h in similarity.similar_products(s, tenant, ext, k=10)} == {
            e for t, e, _, _ in listings if t == tenant and e != ext}
    with admin() as s:
        active = s.execute(text("SELECT id FROM model_versions WHERE kind = 'clip' AND status = 'active'")).scalar_one()
        assert active == result.model_version_id


def test_beat_task_builds_trains_and_gates_as_the_runtime_role(engines: dict[str, Any],
                                                                sample_photos: list[tuple[Path, str]],
                                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``catalog.retrain.finetune_embedder`` as the GPU worker runs it: its sessions are
    ``enrich_worker``'s, its base is the registry's active clip (the one the first test rolled out)."""
    from types import SimpleNamespace

    from models.config import ModelConfig
    from models.factory import build_models
    from tasks.feedback import tasks as retrain_tasks
    from workers.celery_app import app

    assert "tasks.feedback.tasks" in app.conf.include
    assert retrain_tasks.finetune_embedder.name == "catalog.retrain.finetune_embedder"
    owner = sessionmaker(engines["owner"], expire_on_commit=False)
    originals = LocalBlobStore(tmp_path / "originals")
    photos = [p for p in sample_photos if p[1] in ("shorts", "shirt", "outwear")]
    with owner() as s, s.begin():
        made = []
        for n, (path, category) in enumerate(photos):
            want = "holdout" if n < 2 else "train"
            ext = next(e for i in range(1000) if holdout_split("loop-c", e := f"q{n:02d}-{i}", HOLDOUT).value == want)
            uri = originals.put(f"originals/loop-c/{n:02d}", path.read_bytes())
            output = {"title": category, "description": category, "attributes": {"color": COLORS[n % 3]}}
            made.append(add_listing(s, "loop-c", ext, category=category, model_output=output, storage_uri=uri,
                                    dropped=set()))
    for lid in made:
        _review(owner, "loop-c", lid, "accepted")
    runtime = SimpleNamespace(session_factory=sessionmaker(engines["worker"], expire_on_commit=False),
                              datasets=LocalBlobStore(tmp_path / "datasets"), blobs=originals,
                              model_config=ModelConfig(profile="tiny", device="cpu"), models_factory=build_models)
    monkeypatch.setattr(retrain_tasks, "get_runtime", lambda: runtime)
    store = tmp_path / "model-store"
    out = retrain_tasks.finetune_embedder.run(model_store_uri=str(store), min_rows=2, holdout_fraction=HOLDOUT,
                                              settle_s=0.0, epochs=1, learning_rate=1e-3)
    assert out["status"] == "built" and out["rows"] == len(made) and out["trained"] is True
    assert set(out["gate"]) == {"promoted", "reasons", "candidate", "active"}
    with owner() as s:
        row = s.execute(text("SELECT kind, status, params, metrics FROM model_versions WHERE id = :i"),
                        {"i": out["model_version_id"]}).one()
    active_before = row.params["base"]
    assert row.kind == "clip" and row.status == "candidate" and "gate" in row.metrics
    assert active_before.startswith("clip:file://")  # trained from the rolled-out candidate, not the tiny seed
    again = retrain_tasks.finetune_embedder.run(model_store_uri=str(store), min_rows=2, settle_s=0.0)
    assert again == {"status": "empty", "dataset": None, "rows": 0, "trained": False}
