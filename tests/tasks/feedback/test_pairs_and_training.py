"""Retrain loop: incremental pair building, the advisory lock, caps, dedupe, S3 datasets, a tiny DPO step.

Rows are seeded as the superuser test connection and reviewed as the intake does (``enrich_worker``
in the event's tenant); the builder runs as ``enrich_worker`` (beat) with no scope set beforehand
(it sets the system scope itself), training and promotion as ``enrich_admin`` (``enrich retrain``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from db.tables import ModelVersion
from models.categories import CATEGORIES
from models.dpo import DpoConfig
from models.listing import ListingGenerator, ListingRequest
from tasks.feedback.datasets import read_manifest, read_split
from tasks.feedback.reviews import apply_review, parse_review_event, review_event_payload
from tasks.feedback.pairs import BuildStatus, RetrainConfig, build_preference_pairs, holdout_split
from tasks.io.blobs import LocalBlobStore, open_blob_store
from tasks.feedback.promotion import PromotionError, promote
from tasks.feedback.training import train_candidate
from tests.conftest import ADMIN_ROLE, WORKER_ROLE, in_scope, in_tenant
from tests.tasks.feedback.test_reviews import add_listing

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NOW = RetrainConfig(settle=timedelta(0), holdout_fraction=0.0)


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory, sample_photos: list[tuple[Path, str]]) -> tuple[LocalBlobStore, list[str]]:
    store = LocalBlobStore(tmp_path_factory.mktemp("originals"))
    uris = [store.put(f"originals/t/{n:02d}", path.read_bytes()) for n, (path, _) in enumerate(sample_photos[:4])]
    return store, uris


@pytest.fixture(scope="module")
def generated(generator: ListingGenerator, originals: tuple[LocalBlobStore, list[str]]) -> list[Any]:
    """Real tiny-model listings (schema-valid noise) with their exact model input, one per photo."""
    from PIL import Image

    store, uris = originals
    images = [Image.open(Path(u[len("file://"):])).convert("RGB") for u in uris]
    return generator.predict([ListingRequest(image=im, schema=CATEGORIES["dress"], merchant_title=f"Dress {n}",
                                             merchant_attributes={"material": "cotton"}, image_ref=u)
                              for n, (im, u) in enumerate(zip(images, uris, strict=True))])


def listing(session: Session, tenant: str, ext: str, gen: Any, uri: str, merchant: str = "m1", **kw: Any) -> int:
    return add_listing(session, tenant, ext, merchant=merchant, model_output=gen.output, model_input=gen.model_input,
                       storage_uri=uri, **kw)


def edit(session: Session, tenant: str, listing_id: int, merchant: str = "m1", title: str = "A red summer dress") -> None:
    payload = review_event_payload(tenant_id=tenant, merchant_id=merchant, listing_id=listing_id, decision="edited",
                                   corrected={"title": title, "attributes": {"color": "red", "material": "silk"}})
    with in_tenant(session, tenant):  # the review intake's tenant session
        apply_review(session, parse_review_event(json.dumps(payload).encode(), "application/json"))


def accept(session: Session, tenant: str, listing_id: int, merchant: str = "m1") -> None:
    payload = review_event_payload(tenant_id=tenant, merchant_id=merchant, listing_id=listing_id, decision="accepted")
    with in_tenant(session, tenant):
        apply_review(session, parse_review_event(json.dumps(payload).encode(), "application/json"))


def build(session: Session, store: Any, config: RetrainConfig = NOW, role: str = WORKER_ROLE) -> Any:
    """One builder run as ``role``, with no tenant or scope set: the builder sets the system scope."""
    with in_scope(session, role):
        return build_preference_pairs(session, store, config)


def test_pairs_are_incremental_and_valid(db_session: Session, generated: list[Any], originals, tmp_path: Path) -> None:  # noqa: ANN001
    s, (_, uris) = db_session, originals
    store = LocalBlobStore(tmp_path / "datasets")
    first = [listing(s, "rt-inc", f"p{n}", generated[n], uris[n]) for n in range(2)]
    for lid in first:
        edit(s, "rt-inc", lid)
    built = build(s, store)
    # The edit corrects both phases (a title and a colour): one pair per phase, each with that phase's prompt.
    assert built.status is BuildStatus.built and built.pairs == 4
    rows = read_split(store, built.uri, "train")
    assert {r["listing_id"] for r in rows} == set(first) and sorted(r["part"] for r in rows) == ["attributes",
                                                                                                 "attributes",
                                                                                                 "text", "text"]
    for r in rows:
        gen = generated[first.index(r["listing_id"])]
        chosen, rejected = json.loads(r["chosen"]), json.loads(r["rejected"])
        phase = gen.model_input["phases"][r["part"]]
        if r["part"] == "text":
            assert chosen["title"] == "A red summer dress" and set(chosen) == {"title", "description"}
            assert rejected == {k: gen.output[k] for k in ("title", "description")}
        else:
            assert chosen["color"] == "red"
            assert "material" not in chosen  # merchant-only attributes are never model output
            assert rejected == gen.output["attributes"]
        assert r["prompt"] == phase["prompt_text"]
        assert r["images"] == [uris[first.index(r["listing_id"])]]

    assert build(s, store).status is BuildStatus.empty  # nothing new
    later = listing(s, "rt-inc", "p2", generated[2], uris[2])
    edit(s, "rt-inc", later)
    again = build(s, store)
    assert again.status is BuildStatus.built and again.watermark > built.watermark
    assert [r["listing_id"] for r in read_split(store, again.uri, "train")] == [later, later]


def test_verification_drops_dedupe_and_merchant_caps(db_session: Session, generated: list[Any], originals,  # noqa: ANN001
                                                     tmp_path: Path) -> None:
    s, (_, uris) = db_session, originals
    store = LocalBlobStore(tmp_path / "datasets")
    optional = [a for a in CATEGORIES["dress"].visual_attributes if a not in CATEGORIES["dress"].required_attributes]
    gen = next((g for g in generated if set(g.output["attributes"]) & set(optional)), None)
    # Accepted with a dropped optional attribute → pair; with a dropped required one → invalid, no pair.
    if gen is not None:
        drop = next(a for a in gen.output["attributes"] if a in optional)
        accepted = listing(s, "rt-cap", "drop-ok", gen, uris[0], merchant="m3", dropped={drop})  # not capped
        accept(s, "rt-cap", accepted, merchant="m3")
    broken = listing(s, "rt-cap", "drop-bad", generated[1], uris[1], dropped={"color"})
    accept(s, "rt-cap", broken)
    # Same prompt, image and correction twice → one pair; merchant m1 edits 4 listings, cap 2.
    twins = [listing(s, "rt-cap", f"twin{n}", generated[3], uris[3], merchant="m2") for n in range(2)]
    for lid in twins:
        edit(s, "rt-cap", lid, merchant="m2")
    capped = [listing(s, "rt-cap", f"c{n}", generated[n % 3], uris[n % 3]) for n in range(4)]
    for n, lid in enumerate(capped):
        edit(s, "rt-cap", lid, title=f"A red summer dress no. {n}")

    result = build(s, store, RetrainConfig(settle=timedelta(0), merchant_cap=2))
    rows = read_split(store, result.uri, "train") + read_split(store, result.uri, "holdout")
    by_listing = {r["listing_id"]: r for r in rows}
    assert result.dropped["chosen_invalid"] == 1 and broken not in by_listing
    # Duplicates: both phases' pairs of the second twin, and c0's attribute pair, which is c3's (same
    # prompt, image and colour correction; only their titles differ).
    assert result.dropped["duplicate"] == 3 and len(set(twins) & set(by_listing)) == 1
    # The cap counts reviews: m1's two newest are kept with every pair, the older ones lose theirs.
    assert result.dropped["merchant_cap"] >= 3 and set(capped[2:]) <= set(by_listing)
    assert not set(capped[:2]) & set(by_listing)
    if gen is not None:
        assert by_listing[accepted]["source"] == "verification_drop"
        assert by_listing[accepted]["part"] == "attributes"  # only the attributes changed
        assert drop not in json.loads(by_listing[accepted]["chosen"])
    manifest = read_manifest(store, result.uri)
    assert manifest["counts"]["pairs"] == len(rows) and manifest["counts"]["by_category"] == {"dress": len(rows)}
    assert manifest["schema_versions"] == ["dress@1"] and manifest["model_versions"]
    assert manifest["content_hash"] and manifest["window"]["start"]


def test_two_concurrent_runs_produce_one_dataset(engine, worker_engine, generated: list[Any], originals,  # noqa: ANN001
                                                 tmp_path: Path) -> None:
    """Committed data: run A holds the advisory lock while run B starts on another connection, both
    as beat runs them (``enrich_worker``); seeded and cleaned up as the superuser."""
    factory = sessionmaker(engine, expire_on_commit=False)
    workers = sessionmaker(worker_engine, expire_on_commit=False)
    store, uris = LocalBlobStore(tmp_path / "datasets"), originals[1]
    tenant = "rt-lock"
    with factory() as s:  # these runs commit: the builder's read position is put back afterwards
        position = s.execute(text("SELECT watermark FROM builder_watermarks WHERE builder = 'dpo-pairs'")).scalar()
    try:
        with factory() as s, s.begin():
            edit(s, tenant, listing(s, tenant, "p0", generated[0], uris[0]))
        with workers() as a, workers() as b:
            with a.begin():
                first = build_preference_pairs(a, store, NOW)
                with b.begin():
                    second = build_preference_pairs(b, store, NOW)
            with b.begin():
                third = build_preference_pairs(b, store, NOW)
        assert (first.status, second.status, third.status) == (BuildStatus.built, BuildStatus.skipped,
                                                                BuildStatus.empty)
        with factory() as s:
            assert s.execute(text("SELECT count(*) FROM training_datasets WHERE name = :n"),
                             {"n": first.name}).scalar_one() == 1
    finally:
        with factory() as s, s.begin():
            s.execute(text("DELETE FROM training_datasets WHERE id IN (SELECT dataset_id FROM preference_pairs "
                           "WHERE tenant_id = :t)"), {"t": tenant})
            for table in ("preference_pairs", "field_errors", "review_feedback", "inbox_events", "listings",
                          "images", "products", "merchants"):
                s.execute(text(f"DELETE FROM {table} WHERE tenant_id = :t"), {"t": tenant})
            s.execute(text("DELETE FROM tenants WHERE id = :t"), {"t": tenant})
            s.execute(text("DELETE FROM model_versions m WHERE m.name = 'tiny-vlm' AND NOT EXISTS "
                           "(SELECT 1 FROM listings l WHERE l.model_version_id = m.id)"))
            s.execute(text("DELETE FROM builder_watermarks WHERE builder = 'dpo-pairs'"))
            if position is not None:
                s.execute(text("INSERT INTO builder_watermarks (builder, watermark) VALUES ('dpo-pairs', :w)"),
                          {"w": position})


@pytest.fixture
def moto_s3() -> Iterator[Any]:
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    client = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
    client.create_bucket(Bucket="datasets")
    yield client
    server.stop()


def test_dataset_on_s3_loads_as_a_trl_dpo_dataset(db_session: Session, generated: list[Any], originals, moto_s3,  # noqa: ANN001
                                                  tmp_path: Path) -> None:
    import datasets

    s, uris = db_session, originals[1]
    for n in range(3):
        edit(s, "rt-s3", listing(s, "rt-s3", f"p{n}", generated[n], uris[n]))
    store = open_blob_store("s3://datasets/dpo", s3_client_factory=lambda: moto_s3)
    result = build(s, store)
    assert result.uri == f"s3://datasets/dpo/{result.name}"
    files = {}
    for split in ("train", "holdout"):
        files[split] = tmp_path / f"{split}.jsonl"
        moto_s3.download_file("datasets", f"dpo/{result.name}/{split}.jsonl", str(files[split]))
    loaded = datasets.load_dataset("json", data_files={"train": str(files["train"])}, split="train")
    assert {"prompt", "chosen", "rejected", "images"} <= set(loaded.column_names)
    assert len(loaded) == 6  # three edits, each correcting both phases
    row = loaded[0]
    assert all(isinstance(row[k], str) and row[k] for k in ("prompt", "chosen", "rejected"))
    assert row["prompt"].count("<image>") == 1 and row["images"][0].startswith("file://")
    recorded = s.execute(text("SELECT uri, content_hash FROM training_datasets WHERE name = :n"),
                         {"n": result.name}).one()
    assert recorded.uri == result.uri and len(recorded.content_hash) == 64


def test_tiny_dpo_step_registers_a_candidate_and_promotion_is_explicit(  # noqa: PLR0913
        db_session: Session, generator: ListingGenerator, generated: list[Any], originals, tmp_path: Path) -> None:  # noqa: ANN001
    s, (blobs, uris) = db_session, originals
    fraction = 0.5
    exts = [f"dpo{n}" for n in range(40)]
    held = [e for e in exts if holdout_split("rt-dpo", e, fraction).value == "holdout"][:2]
    train = [e for e in exts if holdout_split("rt-dpo", e, fraction).value == "train"][:3]
    for n, ext in enumerate(train + held):
        edit(s, "rt-dpo", listing(s, "rt-dpo", ext, generated[n % 4], uris[n % 4]), title=f"A red dress, take {n}")
    store = LocalBlobStore(tmp_path / "datasets")
    built = build(s, store, RetrainConfig(settle=timedelta(0), holdout_fraction=fraction), role=ADMIN_ROLE)
    # A pair per phase, except the fifth listing's attribute pair, which is the first's (same generated
    # listing and colour correction): the newest copy is kept (holdout), the train one is a duplicate.
    assert read_manifest(store, built.uri)["counts"]["by_split"] == {"train": 5, "holdout": 4}
    active = s.execute(text("SELECT id FROM model_versions WHERE kind = 'vlm' AND status = 'active'")).scalar()

    # enrich retrain train / promote: the maintenance role's sessions (model_versions and
    # training_datasets are platform-level: no scope); the factory shares the test's connection and role.
    with in_scope(s, ADMIN_ROLE):
        factory = sessionmaker(bind=s.connection(), join_transaction_mode="create_savepoint",
                               expire_on_commit=False)
        result = train_candidate(factory, datasets=store, originals=blobs, generator=generator,
                                 dataset_name=built.name, model_store=LocalBlobStore(tmp_path / "candidates"),
                                 config=DpoConfig(max_steps=3, learning_rate=1e-2),
                                 eval_max_new_tokens=48)

        row = s.get(ModelVersion, result.model_version_id)
        assert row is not None and row.kind == "vlm" and row.status == "candidate" and row.random_weights
        assert (result.weights_dir / "config.json").exists() and row.params["dataset"] == built.name
        holdout = row.metrics["holdout"]
        assert holdout["pairs"] == 4 and holdout["schema_valid_rate"] == 1.0
        assert 0.0 <= holdout["field_accuracy"] <= 1.0
        dpo = row.metrics["dpo"]
        assert dpo["steps"] == 3 and dpo["last_loss"] < dpo["first_loss"]

        assert row.name == row.weights_uri == result.weights_uri and row.revision.startswith("sha256-")
        assert result.weights_uri.endswith(f"/vlm/{row.revision}")  # content-addressed in the model store

        refused = promote(s, result.model_version_id, margin=1.01)  # nothing beats its base by more than 100 %
        assert not refused.promoted and any("does not beat" in r for r in refused.reasons)
        s.expire_all()
        assert s.get(ModelVersion, result.model_version_id).status == "candidate"
        assert s.get(ModelVersion, result.model_version_id).metrics["gate"]["promoted"] is False
        with pytest.raises(PromotionError, match="--reason"):
            promote(s, result.model_version_id, margin=1.01, force=True)
        decision = promote(s, result.model_version_id, margin=1.01, force=True,
                           reason="test: promote the tiny candidate")
        s.expire_all()
        assert decision.promoted and decision.forced
        assert s.get(ModelVersion, result.model_version_id).status == "active"
        assert decision.retired_version_id == active
        if active is not None:
            assert s.get(ModelVersion, active).status == "retired"
        gate = s.get(ModelVersion, result.model_version_id).metrics["gate"]
        assert gate["forced"] and gate["reason"] == "test: promote the tiny candidate"


def test_beat_task_runs_the_builder(db_session: Session, generated: list[Any], originals, tmp_path: Path,  # noqa: ANN001
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from tasks.feedback import tasks as retrain_tasks
    from workers.celery_app import app

    assert retrain_tasks.build_pairs.name == "catalog.retrain.build_pairs" and "tasks.feedback.tasks" in app.conf.include
    assert app.conf.beat_schedule["retrain-build-pairs"]["task"] == "catalog.retrain.build_pairs"
    s, uris = db_session, originals[1]
    edit(s, "rt-task", listing(s, "rt-task", "p0", generated[0], uris[0]))
    factory = sessionmaker(bind=s.connection(), join_transaction_mode="create_savepoint", expire_on_commit=False)
    runtime = SimpleNamespace(session_factory=factory, datasets=LocalBlobStore(tmp_path / "datasets"), retrain=NOW)
    monkeypatch.setattr(retrain_tasks, "get_runtime", lambda: runtime)
    with in_scope(s, WORKER_ROLE):  # beat's worker: the factory shares the test's connection and role
        assert retrain_tasks.build_pairs.run()["status"] == "built"
        assert retrain_tasks.build_pairs.run()["status"] == "empty"
