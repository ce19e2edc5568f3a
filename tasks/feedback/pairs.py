"""DPO preference pairs from merchant feedback, built incrementally into versioned datasets.

One run, in one transaction under a transaction-scoped advisory lock (a concurrent run is
``skipped``): read the feedback after the builder's read position (``builder_watermarks``, moved
forward by every run that read feedback, pairs or not, so a long stretch of reviews that make no
pair is never re-read) inside the time window, keep each listing's latest review, and build pairs:

- ``merchant_correction``: prompt = the listing's exact model input (rendered prompt text, the
  stored original's URI and grounding box, the schema id), rejected = the model's JSON,
  chosen = the model's JSON with the review's corrections applied, valid under the same schema;
- ``verification_drop``: for a listing accepted without corrections whose visual verification
  dropped attributes, chosen = the verified listing as generated, rejected = the raw model output.

The model's side is always ``model_output`` (and ``generated_content`` once a merchant edited the
listing), never ``content``, which serves the merchant's corrections after an edit.

Pairs are de-duplicated by content hash (against earlier datasets too), capped per merchant,
split into train/holdout by a hash of the product, written with ``tasks.feedback.datasets`` and recorded.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import structlog
from jsonschema import ValidationError
from sqlalchemy.orm import Session

from db.engine import set_system_scope
from db.enums import DatasetSplit, PairSource, ReviewDecision
from db.repositories import datasets as dataset_rows
from db.repositories import locks, model_versions
from models.categories import CategorySchema, load_schema, validate_listing
from models.errors import UnsupportedCategory
from tasks.feedback.datasets import listing_json, write_dataset
from tasks.feedback.reviews import MERCHANT_SOURCE, has_corrections
from tasks.io.blobs import BlobStore

log = structlog.get_logger(__name__)

ADVISORY_LOCK_KEY = 0x0D90_7EA1  # one pair builder at a time across all beat/worker processes
BUILDER = "dpo-pairs"  # its row in builder_watermarks
# Review transactions are short and statements time out after 30 s: feedback older than twice that
# has committed, so no lower feedback id can still appear behind the watermark.
DEFAULT_SETTLE = timedelta(seconds=60)


@dataclass(frozen=True)
class RetrainConfig:
    window_days: int = 30
    merchant_cap: int = 200
    holdout_fraction: float = 0.1
    settle: timedelta = DEFAULT_SETTLE
    max_feedback: int = 50_000


class BuildStatus(StrEnum):
    built = "built"
    empty = "empty"  # no new feedback, or none that makes a valid pair
    skipped = "skipped"  # another run holds the lock


@dataclass(frozen=True)
class Pair:
    feedback_id: int
    tenant_id: str
    merchant_id: str
    listing_id: int
    product_id: int
    external_id: str
    category: str
    source: PairSource
    schema: CategorySchema
    prompt: dict[str, Any]
    chosen: dict[str, Any]
    rejected: dict[str, Any]
    vlm_version_id: int | None
    part: str = "listing"  # listing | attributes | text: which generation phase the pair teaches

    @property
    def pair_hash(self) -> str:
        doc = [self.tenant_id, self.prompt["text"], self.prompt["image_uri"], self.chosen, self.rejected]
        return hashlib.sha256(json.dumps(doc, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@dataclass
class BuildResult:
    status: BuildStatus
    dataset_id: int | None = None
    name: str | None = None
    uri: str | None = None
    pairs: int = 0
    watermark: int = 0
    dropped: dict[str, int] = field(default_factory=dict)


def holdout_split(tenant_id: str, external_id: str, fraction: float) -> DatasetSplit:
    """Every version and listing of one product lands on the same side, in every dataset."""
    digest = hashlib.sha256(f"{tenant_id}\x1f{external_id}".encode()).digest()
    return DatasetSplit.holdout if int.from_bytes(digest[:8]) / 2**64 < fraction else DatasetSplit.train


def corrected_listing(schema: CategorySchema, model_output: dict[str, Any], corrected: dict[str, Any]) -> dict[str, Any]:
    """The model's JSON with the merchant's corrections; merchant-only attributes are not model output."""
    out = json.loads(json.dumps(model_output))
    for name in ("title", "description"):
        if name in corrected:
            out[name] = corrected[name]
    attributes = dict(out.get("attributes") or {})
    for name, value in (corrected.get("attributes") or {}).items():
        if name in schema.visual_attributes:
            attributes[name] = value
    out["attributes"] = attributes
    return out


def verified_listing(schema: CategorySchema, content: dict[str, Any]) -> dict[str, Any]:
    """The verified content (dropped attributes already absent) in model-output shape."""
    attrs = {k: (v.get("value") if isinstance(v, dict) else v) for k, v in (content.get("attributes") or {}).items()
             if k in schema.visual_attributes}
    return {"title": content.get("title", ""), "description": content.get("description", ""), "attributes": attrs}


def _pair_from_row(row: Any, drops: Counter[str]) -> list[Pair] | None:
    try:
        name, _, version = row.schema_id.partition("@")
        schema = load_schema(name, int(version) if version.isdigit() else None)
    except UnsupportedCategory:
        drops["unknown_schema"] += 1
        return None
    model_input = row.model_input or {}
    if not (model_input.get("prompt_text") or model_input.get("phases")) or not row.model_output:
        drops["no_model_input"] += 1
        return None
    corrected = row.corrected or {}
    correction = corrected_listing(schema, row.model_output, corrected) if has_corrections(corrected) else None
    accepted = row.decision == ReviewDecision.accepted.value
    if correction is not None and (not accepted or correction != row.model_output):
        source, chosen = PairSource.merchant_correction, correction
    elif accepted and row.dropped_attributes:
        shown = (row.content or {}).get("attributes") or {}
        # A merchant who put back what verification dropped did not prefer the drop.
        if any(isinstance(shown.get(name), dict) and shown[name].get("source") == MERCHANT_SOURCE
               for name in row.dropped_attributes):
            drops["merchant_restored"] += 1
            return None
        # The verified listing as the pipeline generated it: after an edit ``content`` is the merchant's.
        generated = row.generated_content or row.content
        source, chosen = PairSource.verification_drop, verified_listing(schema, generated)
    else:
        drops["no_preference"] += 1  # accepted as generated, or rejected without a correction
        return None
    if chosen == row.model_output:
        drops["no_change"] += 1
        return None
    try:
        validate_listing(schema, chosen)
    except ValidationError:
        drops["chosen_invalid"] += 1
        return None
    pairs = []
    for part, prompt_text, chosen_part, rejected_part in _parts(model_input, chosen, row.model_output):
        prompt = {"text": prompt_text, "schema_id": schema.schema_id, "image_uri": row.storage_uri,
                  "box": row.box, "locale": model_input.get("locale"),
                  "merchant_data": model_input.get("merchant_data"), "model": model_input.get("model")}
        pairs.append(Pair(feedback_id=row.feedback_id, tenant_id=row.tenant_id, merchant_id=row.merchant_id,
                          listing_id=row.listing_id, product_id=row.product_id, external_id=row.external_id,
                          category=row.category, source=source, schema=schema, prompt=prompt, chosen=chosen_part,
                          rejected=rejected_part, vlm_version_id=row.model_version_id, part=part))
    return pairs


def _parts(model_input: dict[str, Any], chosen: dict[str, Any],
           rejected: dict[str, Any]) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """(part, prompt, chosen, rejected) per generation phase whose output the preference changes.

    A two-phase listing (``model_input["phases"]``) gives an ``attributes`` pair (phase one's prompt)
    and a ``text`` pair (phase two's prompt, which carries the verified facts it was written from),
    each only where chosen and rejected differ; a listing from before the phases gives one pair of
    whole listings."""
    phases = model_input.get("phases")
    if not phases:
        return [("listing", model_input["prompt_text"], chosen, rejected)]
    out = []
    if chosen.get("attributes") != rejected.get("attributes"):
        out.append(("attributes", phases["attributes"]["prompt_text"], chosen.get("attributes") or {},
                    rejected.get("attributes") or {}))
    text = {k: chosen.get(k) for k in ("title", "description")}
    if text != {k: rejected.get(k) for k in ("title", "description")}:
        out.append(("text", phases["text"]["prompt_text"], text, {k: rejected.get(k) for k in ("title", "description")}))
    return out


def _dedupe_and_cap(session: Session, pairs: list[Pair], cap: int, drops: Counter[str]) -> list[Pair]:
    hashes = [p.pair_hash for p in pairs]
    known = dataset_rows.known_pair_hashes(session, hashes)
    seen: set[str] = set()
    per_merchant: dict[tuple[str, str], list[Pair]] = defaultdict(list)
    reviews: dict[tuple[str, str], set[int]] = defaultdict(set)
    for pair, h in sorted(zip(pairs, hashes, strict=True), key=lambda ph: -ph[0].feedback_id):
        if h in known or h in seen:
            drops["duplicate"] += 1
            continue
        seen.add(h)
        merchant = (pair.tenant_id, pair.merchant_id)
        # The cap counts reviews, not pairs: one review gives a pair per generation phase it corrects.
        if pair.feedback_id not in reviews[merchant] and len(reviews[merchant]) >= cap:
            drops["merchant_cap"] += 1  # the newest reviews of each merchant are kept
            continue
        reviews[merchant].add(pair.feedback_id)
        per_merchant[merchant].append(pair)
    return sorted((p for b in per_merchant.values() for p in b), key=lambda p: p.feedback_id)


def _model_names(session: Session, ids: set[int]) -> list[str]:
    return sorted(model_versions.display_names(session, ids).values())


def _row(pair: Pair, split: DatasetSplit) -> dict[str, Any]:
    return {"prompt": pair.prompt["text"], "chosen": listing_json(pair.schema, pair.chosen, pair.part),
            "rejected": listing_json(pair.schema, pair.rejected, pair.part), "part": pair.part,
            "images": [pair.prompt["image_uri"]],
            "image_box": pair.prompt["box"], "schema_id": pair.schema.schema_id, "category": pair.category,
            "source": pair.source.value, "split": split.value, "listing_id": pair.listing_id,
            "merchant_data": pair.prompt["merchant_data"], "locale": pair.prompt["locale"],
            "pair_hash": pair.pair_hash}


def build_preference_pairs(session: Session, store: BlobStore, config: RetrainConfig = RetrainConfig()) -> BuildResult:
    """One incremental run (flush only; the caller commits). Files are written before the rows.
    Cross-tenant by nature: the transaction runs in the system scope (row-level security)."""
    set_system_scope(session)
    if not locks.try_xact_lock(session, ADVISORY_LOCK_KEY):
        log.info("retrain.skipped", reason="locked")
        return BuildResult(BuildStatus.skipped)
    watermark = dataset_rows.read_position(session, BUILDER)
    rows = dataset_rows.new_feedback(session, after=watermark, window=timedelta(days=config.window_days),
                                     settle=config.settle, limit=config.max_feedback)
    if not rows:
        return BuildResult(BuildStatus.empty, watermark=watermark)
    new_watermark = max(r.feedback_id for r in rows)
    # Recorded whatever this run yields, in its transaction: the next run starts after these rows.
    dataset_rows.advance_read_position(session, BUILDER, new_watermark)
    latest = {r.listing_id: r for r in rows}  # ordered by id: a listing's latest review wins
    drops: Counter[str] = Counter(superseded_review=len(rows) - len(latest))
    pairs = [p for r in latest.values() for p in (_pair_from_row(r, drops) or [])]
    pairs = _dedupe_and_cap(session, pairs, config.merchant_cap, drops) if pairs else []
    if not pairs:
        log.info("retrain.empty", feedback=len(rows), watermark=new_watermark, dropped=dict(drops))
        return BuildResult(BuildStatus.empty, watermark=new_watermark, dropped=dict(drops))

    splits = {p.pair_hash: holdout_split(p.tenant_id, p.external_id, config.holdout_fraction) for p in pairs}
    rows_by_split: dict[str, list[dict[str, Any]]] = {s.value: [] for s in DatasetSplit}
    for p in pairs:
        rows_by_split[splits[p.pair_hash].value].append(_row(p, splits[p.pair_hash]))
    window_start, window_end = min(r.created_at for r in rows), max(r.created_at for r in rows)
    manifest = {
        "counts": {"pairs": len(pairs), "by_split": {k: len(v) for k, v in rows_by_split.items()},
                   "by_category": dict(Counter(p.category for p in pairs)),
                   "by_source": dict(Counter(p.source.value for p in pairs)),
                   "merchants": len({(p.tenant_id, p.merchant_id) for p in pairs})},
        "window": {"start": window_start.isoformat(), "end": window_end.isoformat(), "days": config.window_days},
        "feedback_ids": {"after": watermark, "through": new_watermark},
        "schema_versions": sorted({p.schema.schema_id for p in pairs}),
        "model_versions": _model_names(session, {p.vlm_version_id for p in pairs if p.vlm_version_id}),
        "dropped": dict(drops), "merchant_cap": config.merchant_cap, "holdout_fraction": config.holdout_fraction,
    }
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    provisional = hashlib.sha256("".join(sorted(splits)).encode()).hexdigest()[:8]
    name = f"dpo-{stamp}-{provisional}"
    written = write_dataset(store, name, rows_by_split, manifest)
    dataset = dataset_rows.add_dataset(session, name=name, uri=written.uri, content_hash=written.content_hash,
                                       manifest=written.manifest, watermark_feedback_id=new_watermark,
                                       window_start=window_start, window_end=window_end)
    dataset_rows.add_pairs(session, [
        dict(tenant_id=p.tenant_id, dataset_id=dataset.id, listing_id=p.listing_id, product_id=p.product_id,
             merchant_id=p.merchant_id, category=p.category, source=p.source.value,
             split=splits[p.pair_hash].value, pair_hash=p.pair_hash, prompt=p.prompt, chosen=p.chosen,
             rejected=p.rejected) for p in pairs
    ])
    log.info("retrain.built", dataset=name, pairs=len(pairs), watermark=new_watermark, dropped=dict(drops))
    return BuildResult(BuildStatus.built, dataset_id=dataset.id, name=name, uri=written.uri, pairs=len(pairs),
                       watermark=new_watermark, dropped=dict(drops))
