"""Embedder training data from the catalog: accepted and merchant-edited listings as (crop, facts) rows.

One run, in one transaction under its own transaction-scoped advisory lock (a concurrent run is
``skipped``), reads the reviews after the builder's read position (``builder_watermarks``, builder
``clip-pairs``; moved forward by every run that read reviews) and keeps each listing whose *current*
status is accepted or edited (a later rejection wins over an earlier acceptance). A row is

- the stored original's URI and the grounding box the pipeline cropped (``null`` when it embedded
  the whole photo: no grounding, or the detector's fallback),
- the category and the visual attributes the listing shows now: values the CLIP verification kept,
  or the merchant's corrections (``attribute_sources`` says which); merchant-only attributes
  (material, size, ...) are not visual and are left out, as are values outside the schema,
- tenant, merchant, product and listing ids.

The text the embedder learns is built from those facts at training time by the pipeline's own
``models.embeddings.visual_description`` (this module runs on beat and the cpu queue, which never
import the ML stack). Rows are split train/holdout by a hash of (tenant, product)
(``pairs.holdout_split``: the same product is on the same side in every dataset, DPO ones too) and
written as ``<name>/train.jsonl``, ``<name>/holdout.jsonl``, then ``<name>/manifest.json`` with a
``training_datasets`` row.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy.orm import Session

from db.engine import set_system_scope
from db.enums import DatasetSplit, ListingStatus
from db.repositories import datasets as dataset_rows
from db.repositories import locks
from tasks.feedback.datasets import write_dataset
from tasks.feedback.pairs import DEFAULT_SETTLE, BuildResult, BuildStatus, holdout_split
from tasks.feedback.reviews import listing_schema

log = structlog.get_logger(__name__)

ADVISORY_LOCK_KEY = 0x0D90_7EA2  # one embedder-data builder at a time (the pair builder holds ...EA1)
BUILDER = "clip-pairs"
NAME_PREFIX = "clip-"
FORMAT = "clip-contrastive-jsonl/1"
COLUMNS = ("image_uri", "image_box", "category", "attributes", "product_id")
KEPT_STATUSES = (ListingStatus.accepted.value, ListingStatus.edited.value)


@dataclass(frozen=True)
class EmbedderDataConfig:
    window_days: int = 30
    holdout_fraction: float = 0.1
    settle: timedelta = DEFAULT_SETTLE
    max_feedback: int = 50_000


def visual_facts(schema: Any, content: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """(attribute -> value, attribute -> source) of the visual attributes a listing shows now."""
    facts: dict[str, str] = {}
    sources: dict[str, str] = {}
    for name, entry in (content.get("attributes") or {}).items():
        value = entry.get("value") if isinstance(entry, dict) else entry
        allowed = schema.visual_attributes.get(name)
        if allowed is None or value is None or (allowed and value not in allowed):
            continue
        facts[name] = str(value)
        sources[name] = (entry.get("source") if isinstance(entry, dict) else None) or "image"
    return facts, sources


def training_row(r: Any, drops: Counter[str]) -> dict[str, Any] | None:
    if r.status not in KEPT_STATUSES:
        drops[f"listing_{r.status}"] += 1
        return None
    schema = listing_schema(r.schema_id)
    if schema is None:
        drops["unknown_schema"] += 1
        return None
    facts, sources = visual_facts(schema, r.content or {})
    row = {"image_uri": r.storage_uri, "image_box": None if r.fallback or not r.box else list(r.box),
           "category": r.category, "schema_id": r.schema_id, "attributes": facts, "attribute_sources": sources,
           "tenant_id": r.tenant_id, "merchant_id": r.merchant_id, "product_id": r.product_id,
           "external_id": r.external_id, "listing_id": r.listing_id, "decision": r.status}
    row["row_hash"] = hashlib.sha256(json.dumps(row, sort_keys=True).encode()).hexdigest()
    return row


def build_embedder_dataset(session: Session, store: Any,
                           config: EmbedderDataConfig = EmbedderDataConfig()) -> BuildResult:
    """One incremental run (flush only; the caller commits). Cross-tenant: system scope."""
    set_system_scope(session)
    if not locks.try_xact_lock(session, ADVISORY_LOCK_KEY):
        log.info("embedder_data.skipped", reason="locked")
        return BuildResult(BuildStatus.skipped)
    watermark = dataset_rows.read_position_of(session, BUILDER)
    rows = dataset_rows.new_reviewed_listings(session, after=watermark, window=timedelta(days=config.window_days),
                                              settle=config.settle, limit=config.max_feedback)
    if not rows:
        return BuildResult(BuildStatus.empty, watermark=watermark)
    through = max(r.feedback_id for r in rows)
    dataset_rows.advance_read_position(session, BUILDER, through)
    latest = {r.listing_id: r for r in rows}
    drops: Counter[str] = Counter(superseded_review=len(rows) - len(latest))
    items = [row for r in latest.values() if (row := training_row(r, drops)) is not None]
    if not items:
        log.info("embedder_data.empty", reviews=len(rows), watermark=through, dropped=dict(drops))
        return BuildResult(BuildStatus.empty, watermark=through, dropped=dict(drops))
    by_split: dict[str, list[dict[str, Any]]] = {s.value: [] for s in DatasetSplit}
    for item in items:
        item["split"] = holdout_split(item["tenant_id"], item["external_id"], config.holdout_fraction).value
        by_split[item["split"]].append(item)
    start, end = min(r.created_at for r in rows), max(r.created_at for r in rows)
    manifest = {
        "counts": {"rows": len(items), "by_split": {k: len(v) for k, v in by_split.items()},
                   "by_category": dict(Counter(i["category"] for i in items)),
                   "by_decision": dict(Counter(i["decision"] for i in items)),
                   "products": len({(i["tenant_id"], i["product_id"]) for i in items}),
                   "with_box": sum(i["image_box"] is not None for i in items)},
        "window": {"start": start.isoformat(), "end": end.isoformat(), "days": config.window_days},
        "feedback_ids": {"after": watermark, "through": through}, "dropped": dict(drops),
        "holdout_fraction": config.holdout_fraction,
        "text": "models.embeddings.visual_description(category, attributes) at training time",
    }
    digest = hashlib.sha256("".join(sorted(i["row_hash"] for i in items)).encode()).hexdigest()[:8]
    name = f"{NAME_PREFIX}{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}-{digest}"
    written = write_dataset(store, name, by_split, manifest, format=FORMAT, columns=COLUMNS)
    uri, content_hash, full = written.uri, written.content_hash, written.manifest
    # watermark_feedback_id stays 0: that column is the pair builder's read floor (read_position);
    # this builder's range is in the manifest and its position in builder_watermarks.
    dataset = dataset_rows.add_dataset(session, name=name, uri=uri, content_hash=content_hash, manifest=full,
                                       watermark_feedback_id=0, window_start=start, window_end=end)
    log.info("embedder_data.built", dataset=name, rows=len(items), watermark=through, dropped=dict(drops))
    return BuildResult(BuildStatus.built, dataset_id=dataset.id, name=name, uri=uri, pairs=len(items),
                       watermark=through, dropped=dict(drops))
