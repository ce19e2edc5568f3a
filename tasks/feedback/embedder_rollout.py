"""Rollout of a gated clip candidate through the blue/green lifecycle: backfill → compare → activate.

``roll_out`` refuses a trained clip candidate (one registered by ``finetune_candidate``, which
records its dataset) whose gate decision is missing or a refusal; otherwise it runs the existing
steps of ``db.embedding_versions``: the resumable backfill of every searchable listing, the HNSW
recall comparison (stored on the row) and the atomic activation (which itself refuses below 100 %
coverage). Each step is idempotent, so a rollout interrupted anywhere is finished by running it
again. Maintenance work: ``factory`` must run as the maintenance role (``ENRICH_DB__ADMIN_ROLE``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy.orm import Session, sessionmaker

from db import embedding_versions as ev
from db.engine import admin_session
from db.enums import ModelKind
from db.repositories import model_versions

log = structlog.get_logger(__name__)


class RolloutRefused(ValueError):
    """The version may not be rolled out (not clip, not gated, gate refused)."""


@dataclass(frozen=True)
class RolloutResult:
    model_version_id: int
    written: int
    coverage: float
    recall_at_k: float | None
    retired_version_id: int | None


def check_approved(row: Any) -> None:
    if row is None or row.kind != ModelKind.clip.value:
        raise RolloutRefused("only clip versions are rolled out this way")
    if (why := ev.gate_refusal(row.params, row.metrics)) is not None:
        raise RolloutRefused(f"clip version {row.id} has not passed the gate: {why}")


def roll_out(factory: sessionmaker[Session], version_id: int, embed: ev.EmbedBatch, *, batch_size: int = 64,
             on_progress: Any = None) -> RolloutResult:
    with admin_session(factory) as session:
        check_approved(model_versions.get(session, version_id))
    report = ev.run_backfill(factory, version_id, embed, batch_size=batch_size, on_progress=on_progress)
    with admin_session(factory) as session:
        comparison = ev.compare(session, version_id)
    with admin_session(factory) as session:
        retired = ev.activate(session, version_id)
    log.info("embedder_rollout.active", model_version_id=version_id, written=report.written,
             coverage=report.coverage.ratio, recall=comparison.recall_at_k, retired=retired)
    return RolloutResult(version_id, report.written, report.coverage.ratio, comparison.recall_at_k,
                         retired if retired != version_id else None)
