"""The promotion gate: a listing-model candidate becomes the active version only if it is better.

A candidate carries the held-out evaluation ``train_candidate`` ran: its own (``holdout``) and its
base model's on the same pairs (``base_holdout``). The gate promotes when

- the base it was evaluated against is the version active now (otherwise the comparison says
  nothing about replacing the active one),
- both evaluations exist (a dataset without held-out pairs proves nothing),
- the candidate's held-out ``field_accuracy`` beats the base's by at least ``margin``, and
- it does not have random weights where the active version is real.

``force`` (with a ``reason``, required) overrides a refusal. Every decision, promoted or refused,
is stored on the candidate's row (``metrics.gate``) with the figures it was taken on; a refusal
leaves both versions as they were. GPU workers serve the new active version from their next
registry poll (``tasks.pipeline.serving``), and the reconciler re-enriches the catalog with it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy.orm import Session

from db.enums import ModelKind, ModelStatus
from db.repositories import model_versions

log = structlog.get_logger(__name__)

GATE_METRIC = "field_accuracy"


class PromotionError(ValueError):
    """The request itself is wrong (unknown version, not a vlm candidate, force without a reason)."""


@dataclass(frozen=True)
class GateDecision:
    model_version_id: int
    promoted: bool
    reasons: list[str] = field(default_factory=list)  # why it was refused (or what force overrode)
    metric: str = GATE_METRIC
    candidate: float | None = None
    active: float | None = None
    margin: float = 0.0
    forced: bool = False
    reason: str | None = None
    active_version_id: int | None = None
    retired_version_id: int | None = None


def _holdout(metrics: dict[str, Any], key: str) -> float | None:
    value = (metrics.get(key) or {}).get(GATE_METRIC)
    return float(value) if isinstance(value, int | float) else None


def refusals(candidate: Any, active: Any | None, margin: float) -> tuple[list[str], float | None, float | None]:
    """Why ``candidate`` may not replace ``active`` (empty: it may), with the two figures compared."""
    metrics = candidate.metrics or {}
    ours, theirs = _holdout(metrics, "holdout"), _holdout(metrics, "base_holdout")
    reasons: list[str] = []
    if active is not None:
        base = (candidate.params or {}).get("base")
        active_key = f"vlm:{active.name}@{active.revision}"
        if base != active_key:
            reasons.append(f"evaluated against {base or 'an unknown base'}, but the active version is {active_key}")
        if candidate.random_weights and not active.random_weights:
            reasons.append("the candidate has random weights and the active version is real")
    if ours is None or theirs is None:
        reasons.append(f"no held-out {GATE_METRIC} for the candidate and its base (the dataset had no held-out pairs)")
    elif ours < theirs + margin:
        reasons.append(f"held-out {GATE_METRIC} {ours:.4f} does not beat the base's {theirs:.4f} by {margin}")
    return reasons, ours, theirs


def promote(session: Session, model_version_id: int, *, margin: float = 0.01, force: bool = False,
            reason: str | None = None) -> GateDecision:
    """Decide and, when it passes (or is forced), make the candidate active and retire the active
    version, in the caller's transaction. The decision is recorded either way: commit it."""
    if force and not (reason or "").strip():
        raise PromotionError("--force needs --reason: say why the gate is overridden (it is recorded)")
    rows = model_versions.locked_versions(session, ModelKind.vlm.value)
    target = next((r for r in rows if r.id == model_version_id), None)
    if target is None:
        raise PromotionError(f"model version {model_version_id} is not a vlm version")
    if target.status != ModelStatus.candidate.value:
        raise PromotionError(f"model version {model_version_id} is {target.status}, not a candidate")
    active = next((r for r in rows if r.status == ModelStatus.active.value), None)
    reasons, ours, theirs = refusals(target, active, margin)
    promoted = not reasons or force
    decision = GateDecision(model_version_id=target.id, promoted=promoted, reasons=reasons, candidate=ours,
                            active=theirs, margin=margin, forced=bool(force and reasons), reason=reason,
                            active_version_id=active.id if active else None,
                            retired_version_id=active.id if (promoted and active) else None)
    target.metrics = {**(target.metrics or {}), "gate": {**asdict(decision), "at": datetime.now(UTC).isoformat()}}
    if promoted:
        if active is not None:
            active.status = ModelStatus.retired.value
            session.flush()  # the one-active index must see the old row retired first
        target.status = ModelStatus.active.value
        target.activated_at = datetime.now(UTC)
    session.flush()
    log.info("retrain.gate", model_version_id=target.id, promoted=promoted, forced=decision.forced,
             reasons=reasons, candidate=ours, base=theirs, margin=margin)
    return decision
