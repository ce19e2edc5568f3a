"""Model versions as rows (the registry): every stored output points at the model version that made it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from db.enums import ModelStatus
from db.tables import ModelVersion


def ensure_model_versions(session: Session, versions: dict[str, Any],
                          weights_uris: dict[str, str | None] | None = None) -> dict[str, int]:
    """Upsert one row per model (``ModelVersionInfo``-like objects by kind) and return their ids.
    ``weights_uris`` records where each one's weights are (kept once known). A kind with no active
    version gets this one activated (first deployment)."""
    ids: dict[str, int] = {}
    uris = weights_uris or {}
    for kind, v in versions.items():
        session.execute(
            insert(ModelVersion).values(kind=kind, name=v.name, revision=v.revision, profile=v.profile,
                                        random_weights=v.random_weights, dims=v.dims, weights_uri=uris.get(kind))
            .on_conflict_do_nothing(index_elements=["kind", "name", "revision"])
        )
        row = session.scalar(select(ModelVersion).where(
            ModelVersion.kind == kind, ModelVersion.name == v.name, ModelVersion.revision == v.revision))
        assert row is not None
        if row.weights_uri is None and uris.get(kind):
            row.weights_uri = uris[kind]
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
                     random_weights: bool, params: dict[str, Any], metrics: dict[str, Any],
                     weights_uri: str | None = None, dims: int | None = None) -> int:
    """Register a trained model as a ``candidate`` and return its id. Training the same weights
    again (same kind, name and revision) refreshes params and metrics and keeps the status.
    ``dims``: the vector width of a clip version (what the backfill checks against)."""
    stmt = insert(ModelVersion).values(kind=kind, name=name, revision=revision, profile=profile,
                                       random_weights=random_weights, status=ModelStatus.candidate.value,
                                       params=params, metrics=metrics, weights_uri=weights_uri, dims=dims)
    return session.execute(stmt.on_conflict_do_update(
        index_elements=["kind", "name", "revision"],
        set_={"params": stmt.excluded.params, "metrics": stmt.excluded.metrics},
    ).returning(ModelVersion.id)).scalar_one()


def locked_versions(session: Session, kind: str) -> list[ModelVersion]:
    """Every version of ``kind`` by id, locked until the transaction ends (a status change of one
    is decided while no other transaction can change any of them)."""
    return list(session.scalars(select(ModelVersion).where(ModelVersion.kind == kind)
                                .order_by(ModelVersion.id).with_for_update()).all())


def active(session: Session) -> dict[str, ModelVersion]:
    """The active version of each kind that has one: the registry's answer to "what is served"."""
    rows = session.scalars(select(ModelVersion).where(ModelVersion.status == ModelStatus.active.value)).all()
    return {r.kind: r for r in rows}


def by_ids(session: Session, ids: list[int] | set[int]) -> list[ModelVersion]:
    return list(session.scalars(select(ModelVersion).where(ModelVersion.id.in_(sorted(ids)))).all())


def get(session: Session, version_id: int) -> ModelVersion | None:
    return session.get(ModelVersion, version_id)


def of_kind(session: Session, kind: str) -> list[ModelVersion]:
    return list(session.scalars(select(ModelVersion).where(ModelVersion.kind == kind).order_by(ModelVersion.id)))
