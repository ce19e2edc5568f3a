from __future__ import annotations

import pytest
from pydantic import ValidationError

from workers.settings import ModelProfile, Settings


def test_nested_env_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENRICH_DB__URL", "postgresql://u:realpw@db.internal/enrich")
    monkeypatch.setenv("ENRICH_MODELS__PROFILE", "tiny")
    monkeypatch.setenv("ENRICH_WORKERS__BATCH_SIZE", "16")
    monkeypatch.setenv("ENRICH_STORAGE__ALLOWED_BUCKETS", '["a","b"]')
    s = Settings()
    assert s.db.url == "postgresql://u:realpw@db.internal/enrich"
    assert s.models.profile is ModelProfile.tiny
    assert s.workers.batch_size == 16
    assert s.storage.allowed_buckets == ["a", "b"]


def test_placeholder_password_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENRICH_DB__URL", "postgresql://u:changeme@db/enrich")
    with pytest.raises(ValidationError, match="placeholder password"):
        Settings()


def test_time_limit_must_stay_below_consumer_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENRICH_WORKERS__TIME_LIMIT_S", "4000")
    monkeypatch.setenv("ENRICH_BROKER__CONSUMER_TIMEOUT_S", "1800")
    with pytest.raises(ValidationError, match="CONSUMER_TIMEOUT_S"):
        Settings()


def test_hnsw_graph_defaults_and_an_unbuildable_one_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from db.vector_indexes import DEFAULT_GRAPH

    s = Settings()
    assert (s.db.hnsw_m, s.db.hnsw_ef_construction) == (DEFAULT_GRAPH.m, DEFAULT_GRAPH.ef_construction)
    monkeypatch.setenv("ENRICH_DB__HNSW_M", "32")
    monkeypatch.setenv("ENRICH_DB__HNSW_EF_CONSTRUCTION", "60")
    with pytest.raises(ValidationError, match="HNSW_EF_CONSTRUCTION must be at least 2 x ENRICH_DB__HNSW_M"):
        Settings()


def test_defaults_derive_from_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    monkeypatch.setenv("ENRICH_DATA_DIR", str(tmp_path))
    s = Settings()
    assert s.embedded_db_dir == tmp_path / "pgdata"
    assert s.originals_uri == str(tmp_path / "originals")
    assert s.db.url is None and s.broker.url is None
