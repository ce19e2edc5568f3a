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

A **clip** candidate (``tasks.feedback.embedder_finetune``) goes through the same gate on its
held-out image→image ``mrr``. Passing does not activate it: its vectors must exist first, so a
clip decision is an approval recorded on the row (``metrics.gate.promoted``), and
``tasks.feedback.embedder_rollout`` (backfill → compare → activate) refuses a trained clip
candidate without one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy.orm import Session

from db.enums import ModelKind, ModelStatus
from db.repositories import model_versions

log = structlog.get_logger(__name__)

GATE_METRIC = "field_accuracy"
GATE_METRICS = {ModelKind.vlm.value: GATE_METRIC, ModelKind.clip.value: "mrr"}


class PromotionError(ValueError):
    """The request itself is wrong (unknown version, not a vlm/clip candidate, force without a reason)."""


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
    kind: str = ModelKind.vlm.value
    rollout_required: bool = False  # clip: approved; active only after backfill -> compare -> activate


def _holdout(metrics: dict[str, Any], key: str, metric: str = GATE_METRIC) -> float | None:
    value = (metrics.get(key) or {}).get(metric)
    return float(value) if isinstance(value, int | float) else None


def refusals(candidate: Any, active: Any | None, margin: float) -> tuple[list[str], float | None, float | None]:
    """Why ``candidate`` may not replace ``active`` (empty: it may), with the two figures compared."""
    kind = getattr(candidate, "kind", ModelKind.vlm.value) or ModelKind.vlm.value
    metric = GATE_METRICS.get(kind, GATE_METRIC)
    metrics = candidate.metrics or {}
    ours, theirs = _holdout(metrics, "holdout", metric), _holdout(metrics, "base_holdout", metric)
    reasons: list[str] = []
    if active is not None:
        base = (candidate.params or {}).get("base")
        active_key = f"{kind}:{active.name}@{active.revision}"
        if base != active_key:
            reasons.append(f"evaluated against {base or 'an unknown base'}, but the active version is {active_key}")
        if candidate.random_weights and not active.random_weights:
            reasons.append("the candidate has random weights and the active version is real")
    if ours is None or theirs is None:
        reasons.append(f"no held-out {metric} for the candidate and its base (the dataset had no held-out rows)")
    elif ours < theirs + margin:
        reasons.append(f"held-out {metric} {ours:.4f} does not beat the base's {theirs:.4f} by {margin}")
    return reasons, ours, theirs


def promote(session: Session, model_version_id: int, *, margin: float = 0.01, force: bool = False,
            reason: str | None = None) -> GateDecision:
    """Decide and, when it passes (or is forced), make the candidate active and retire the active
    version, in the caller's transaction. The decision is recorded either way: commit it."""
    if force and not (reason or "").strip():
        raise PromotionError("--force needs --reason: say why the gate is overridden (it is recorded)")
    row = model_versions.get(session, model_version_id)
    kind = row.kind if row is not None and row.kind in GATE_METRICS else ModelKind.vlm.value
    rows = model_versions.locked_versions(session, kind)
    target = next((r for r in rows if r.id == model_version_id), None)
    if target is None:
        raise PromotionError(f"model version {model_version_id} is not a vlm version (nor a clip one)")
    prior = (target.metrics or {}).get("gate") or {}
    if kind == ModelKind.clip.value and target.status == ModelStatus.backfilling.value and prior.get("promoted"):
        # An approved clip candidate whose rollout was interrupted: the decision stands, the rollout resumes.
        return GateDecision(**{f.name: prior[f.name] for f in fields(GateDecision) if f.name in prior})
    if target.status != ModelStatus.candidate.value:
        raise PromotionError(f"model version {model_version_id} is {target.status}, not a candidate")
    active = next((r for r in rows if r.status == ModelStatus.active.value), None)
    reasons, ours, theirs = refusals(target, active, margin)
    promoted = not reasons or force
    rollout = kind == ModelKind.clip.value
    decision = GateDecision(model_version_id=target.id, promoted=promoted, reasons=reasons,
                            metric=GATE_METRICS[kind], candidate=ours,
                            active=theirs, margin=margin, forced=bool(force and reasons), reason=reason,
                            active_version_id=active.id if active else None,
                            retired_version_id=active.id if (promoted and active and not rollout) else None,
                            kind=kind, rollout_required=promoted and rollout)
    target.metrics = {**(target.metrics or {}), "gate": {**asdict(decision), "at": datetime.now(UTC).isoformat()}}
    if promoted and not rollout:
        if active is not None:
            active.status = ModelStatus.retired.value
            session.flush()  # the one-active index must see the old row retired first
        target.status = ModelStatus.active.value
        target.activated_at = datetime.now(UTC)
    session.flush()
    log.info("retrain.gate", model_version_id=target.id, promoted=promoted, forced=decision.forced,
             reasons=reasons, candidate=ours, base=theirs, margin=margin)
    return decision
