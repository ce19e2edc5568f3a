"""A GPU worker serves the registry's active versions, follows a promotion between batches, and
honours a pin; every result names the versions that produced it (tiny models, real database)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from db.repositories import model_versions
from db.tables import ModelVersion
from models.batch import ModelItem
from models.config import ModelConfig
from models.factory import build_models
from models.identity import model_identity
from models.vlm_builders import save_vlm
from tasks.pipeline.serving import ModelServer, config_for, version_ref


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def factory(db_session: Session) -> sessionmaker[Session]:
    # A registry of its own: whatever other tests left active is retired inside this test's transaction.
    db_session.query(ModelVersion).filter_by(status="active").update({"status": "retired"})
    db_session.flush()
    return sessionmaker(bind=db_session.connection(), join_transaction_mode="create_savepoint",
                        expire_on_commit=False)


@pytest.fixture
def base(tmp_path: Path) -> ModelConfig:
    return ModelConfig(profile="tiny", device="cpu", cache_dir=tmp_path / "cache", max_new_tokens=32)


@pytest.fixture
def candidate_dir(generator, tmp_path: Path) -> Path:  # noqa: ANN001
    """A listing model saved as a directory, as training stores one (tuned from the tiny model)."""
    return save_vlm(generator.model, generator.processor, tmp_path / "candidate", random_weights=True,
                    base="tiny@random-seed0", produced_by="tests")


def _promote_directory(s: Session, directory: Path) -> int:
    identity = model_identity("vlm", str(directory), profile="pretrained")
    cid = model_versions.upsert_candidate(s, kind="vlm", name=identity.name, revision=identity.revision,
                                          profile="pretrained", random_weights=identity.random_weights,
                                          params={}, metrics={}, weights_uri=str(directory))
    s.query(ModelVersion).filter_by(kind="vlm", status="active").update({"status": "retired"})
    s.flush()
    s.query(ModelVersion).filter_by(id=cid).update({"status": "active"})
    s.flush()
    return cid


def test_first_deployment_registers_and_activates_the_configured_versions(db_session, factory, base) -> None:  # noqa: ANN001
    served = ModelServer(factory, base, build_models).serving()
    active = model_versions.active(db_session)
    assert served.ids == {kind: row.id for kind, row in active.items()}
    assert served.random_weights and all(row.random_weights for row in active.values())


def test_a_promotion_is_served_from_the_next_poll_and_pins_win(db_session, factory, base, candidate_dir,  # noqa: ANN001
                                                                  sample_photos) -> None:  # noqa: ANN001
    clock = Clock()
    server = ModelServer(factory, base, build_models, poll_s=30, clock=clock)
    pinned = ModelServer(factory, base, build_models, pinned=frozenset({"vlm"}), poll_s=30, clock=clock)
    before = server.serving()
    assert pinned.serving().ids == before.ids

    cid = _promote_directory(db_session, candidate_dir)
    clock.now = 10
    assert server.serving() is before  # no poll due yet: the batch in flight keeps its bundle
    clock.now = 31
    after = server.serving()
    assert after.ids["vlm"] == cid and after.ids["detector"] == before.ids["detector"] and server.switches == 1
    assert after.bundle.config.vlm == str(candidate_dir) and after.bundle.config.profile_of("vlm") == "pretrained"
    assert after.random_weights  # inherited from the tiny base, recorded beside the weights
    assert pinned.serving().ids["vlm"] == before.ids["vlm"] != cid  # the pin keeps the configured model

    path, category = sample_photos[0]
    item = ModelItem(job_id=1, image=Image.open(path).convert("RGB"), category=category, title="t",
                     description="", attributes={}, locale="en")
    (result,) = server.run_batch([item])
    assert result.error is None and result.model_versions == after.ids and result.random_weights


def test_config_for_loads_pretrained_rows_from_their_weights(base, candidate_dir, db_session, factory) -> None:  # noqa: ANN001
    cid = _promote_directory(db_session, candidate_dir)
    row = version_ref(db_session.get(ModelVersion, cid))
    config = config_for(base, {"vlm": row})
    assert (config.vlm, config.profile_of("vlm"), config.profile_of("clip")) == (str(candidate_dir), "pretrained",
                                                                                 "tiny")
    assert build_models(config).versions()["vlm"].revision == row.revision  # the same identity, recomputed


def test_unknown_pinned_kinds_are_refused(factory, base) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="unknown model kinds"):
        ModelServer(factory, base, build_models, pinned=frozenset({"ocr"}))


def test_backfill_and_the_workers_register_one_row_for_one_clip_model(db_session, tmp_path: Path) -> None:  # noqa: ANN001
    """`enrich backfill --model ARCH/tag` and a GPU worker configured with the same ref must write
    under the same model_versions row, or new products would be invisible to search after activation."""
    from db import embedding_versions as ev

    ref = "ViT-B-32/laion2b_s34b_b79k"
    config = ModelConfig(profile="pretrained", clip=ref, cache_dir=tmp_path)
    backfilled = build_models(config).embedder.version()  # what workers.cli.embeddings.load_embedder registers
    # (the worker side: ModelBundle.versions()["clip"] is the same embedder.version())
    backfill_id = ev.register_version(db_session, ev.VersionSpec(
        name=backfilled.name, revision=backfilled.revision, dims=512, profile=backfilled.profile,
        random_weights=backfilled.random_weights))
    worker_ids = model_versions.ensure_model_versions(db_session, {"clip": build_models(config).embedder.version()})
    assert worker_ids["clip"] == backfill_id
