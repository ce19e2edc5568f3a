"""Model versions as rows (the registry): every stored output points at the model version that made it."""

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


def display_names(session: Session, ids: list[int] | set[int]) -> dict[int, str]:
    """``{id: "name@revision"}`` for the given model version ids (unknown ids are left out)."""
    rows = session.execute(select(ModelVersion.id, ModelVersion.name, ModelVersion.revision)
                           .where(ModelVersion.id.in_(sorted(ids)))).all()
    return {r.id: f"{r.name}@{r.revision}" for r in rows}


def upsert_candidate(session: Session, *, kind: str, name: str, revision: str, profile: str,
                     random_weights: bool, params: dict[str, Any], metrics: dict[str, Any]) -> int:
    """Register a trained model as a ``candidate`` and return its id. Training the same weights
    again (same kind, name and revision) refreshes params and metrics and keeps the status."""
    stmt = insert(ModelVersion).values(kind=kind, name=name, revision=revision, profile=profile,
                                       random_weights=random_weights, status=ModelStatus.candidate.value,
                                       params=params, metrics=metrics)
    return session.execute(stmt.on_conflict_do_update(
        index_elements=["kind", "name", "revision"],
        set_={"params": stmt.excluded.params, "metrics": stmt.excluded.metrics},
    ).returning(ModelVersion.id)).scalar_one()


def locked_versions(session: Session, kind: str) -> list[ModelVersion]:
    """Every version of ``kind`` by id, locked until the transaction ends (a status change of one
    is decided while no other transaction can change any of them)."""
    return list(session.scalars(select(ModelVersion).where(ModelVersion.kind == kind)
                                .order_by(ModelVersion.id).with_for_update()).all())
