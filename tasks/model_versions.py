"""Model versions as rows: every stored output points at the model version that made it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from db.enums import ModelStatus
from db.tables import ModelVersion


def ensure_model_versions(session: Session, versions: dict[str, Any]) -> dict[str, int]:
    """Upsert one row per configured model (``ModelVersionInfo``-like objects by kind) and return
    their ids. A kind with no active version gets this one activated (first deployment)."""
    ids: dict[str, int] = {}
    for kind, v in versions.items():
        session.execute(
            insert(ModelVersion).values(kind=kind, name=v.name, revision=v.revision, profile=v.profile,
                                        random_weights=v.random_weights, dims=v.dims)
            .on_conflict_do_nothing(index_elements=["kind", "name", "revision"])
        )
        row = session.scalar(select(ModelVersion).where(
            ModelVersion.kind == kind, ModelVersion.name == v.name, ModelVersion.revision == v.revision))
        assert row is not None
        has_active = session.scalar(select(ModelVersion.id).where(
            ModelVersion.kind == kind, ModelVersion.status == ModelStatus.active.value).with_for_update())
        if has_active is None:
            row.status = ModelStatus.active.value
            row.activated_at = datetime.now(UTC)
        ids[kind] = row.id
    session.flush()
    return ids
