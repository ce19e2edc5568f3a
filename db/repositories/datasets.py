"""Training datasets and their preference pairs as rows, and the feedback a new dataset is built from.

A builder's read position (``builder_watermarks``) is the highest feedback id it has examined,
advanced by every run that read feedback, whether or not it wrote a dataset; a dataset also
records the highest feedback id it consumed (its ``watermark_feedback_id``). Pair hashes are
unique across all datasets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from db.tables import BuilderWatermark, PreferencePair, TrainingDataset

_NEW_FEEDBACK = text("""
    SELECT f.id AS feedback_id, f.tenant_id, f.decision, f.corrected, f.created_at,
           l.id AS listing_id, l.product_id, l.category, l.schema_id, l.content, l.generated_content,
           l.dropped_attributes,
           l.model_output, l.model_input, l.model_version_id, p.merchant_id, p.external_id,
           i.storage_uri, CASE WHEN g.fallback THEN NULL ELSE g.box END AS box  -- the box the listing model's crop came from
    FROM review_feedback f
    JOIN listings l ON l.id = f.listing_id AND l.tenant_id = f.tenant_id
    JOIN products p ON p.id = l.product_id AND p.tenant_id = l.tenant_id
    JOIN images i ON i.id = l.image_id AND i.tenant_id = l.tenant_id
    LEFT JOIN groundings g ON g.id = l.grounding_id AND g.tenant_id = l.tenant_id
    WHERE f.id > :watermark AND f.created_at >= now() - :window AND f.created_at <= now() - :settle
    ORDER BY f.id
    LIMIT :limit
""")


def watermark(session: Session) -> int:
    """The highest feedback id any dataset consumed (0 before the first dataset)."""
    return int(session.execute(text(
        "SELECT coalesce(max(watermark_feedback_id), 0) FROM training_datasets")).scalar_one())


def read_position(session: Session, builder: str) -> int:
    """The feedback id ``builder`` has read through: its recorded watermark, and never below the
    highest id a dataset consumed (datasets built before the builder recorded a position)."""
    return int(session.execute(text(
        "SELECT greatest((SELECT watermark FROM builder_watermarks WHERE builder = :b), "
        "(SELECT max(watermark_feedback_id) FROM training_datasets), 0)"), {"b": builder}).scalar_one())


def advance_read_position(session: Session, builder: str, through: int) -> None:
    """Record that ``builder`` has examined every feedback id up to ``through`` (never moves back)."""
    stmt = insert(BuilderWatermark).values(builder=builder, watermark=through)
    session.execute(stmt.on_conflict_do_update(
        index_elements=["builder"],
        set_={"watermark": func.greatest(BuilderWatermark.watermark, stmt.excluded.watermark),
              "updated_at": func.now()}))


def new_feedback(session: Session, *, after: int, window: timedelta, settle: timedelta,
                 limit: int) -> Sequence[Row[Any]]:
    """Reviews with an id above ``after``, received within ``window`` and at least ``settle`` ago,
    oldest first, each with its listing (content, model input and output), the product's merchant
    and external id, the stored image's URI and the grounding box."""
    return session.execute(_NEW_FEEDBACK, {"watermark": after, "window": window, "settle": settle,
                                           "limit": limit}).all()


def known_pair_hashes(session: Session, hashes: Sequence[str]) -> set[str]:
    """The given pair hashes that a recorded dataset already holds."""
    return set(session.execute(text("SELECT pair_hash FROM preference_pairs WHERE pair_hash = ANY(:h)"),
                               {"h": list(hashes)}).scalars())


def add_dataset(session: Session, *, name: str, uri: str, content_hash: str, manifest: dict[str, Any],
                watermark_feedback_id: int, window_start: datetime | None,
                window_end: datetime) -> TrainingDataset:
    """Record a written dataset (flushed: the returned row has its id)."""
    dataset = TrainingDataset(name=name, uri=uri, content_hash=content_hash, manifest=manifest,
                              watermark_feedback_id=watermark_feedback_id, window_start=window_start,
                              window_end=window_end)
    session.add(dataset)
    session.flush()
    return dataset


def add_pairs(session: Session, pairs: Sequence[Mapping[str, Any]]) -> None:
    """Insert ``preference_pairs`` rows (column → value); a pair hash already recorded is skipped."""
    if not pairs:
        return
    session.execute(insert(PreferencePair).values([dict(p) for p in pairs])
                    .on_conflict_do_nothing(index_elements=["pair_hash"]))


def dataset_named(session: Session, name: str) -> TrainingDataset | None:
    return session.scalar(select(TrainingDataset).where(TrainingDataset.name == name))


_NEW_REVIEWED_LISTINGS = text("""
    SELECT f.id AS feedback_id, f.tenant_id, f.decision, f.created_at,
           l.id AS listing_id, l.product_id, l.category, l.schema_id, l.content, l.status,
           p.merchant_id, p.external_id, i.storage_uri, g.box, coalesce(g.fallback, true) AS fallback
    FROM review_feedback f
    JOIN listings l ON l.id = f.listing_id AND l.tenant_id = f.tenant_id
    JOIN products p ON p.id = l.product_id AND p.tenant_id = l.tenant_id
    JOIN images i ON i.id = l.image_id AND i.tenant_id = l.tenant_id
    LEFT JOIN groundings g ON g.id = l.grounding_id AND g.tenant_id = l.tenant_id
    WHERE f.id > :watermark AND f.created_at >= now() - :window AND f.created_at <= now() - :settle
    ORDER BY f.id
    LIMIT :limit
""")


def new_reviewed_listings(session: Session, *, after: int, window: timedelta, settle: timedelta,
                          limit: int) -> Sequence[Row[Any]]:
    """Reviews with an id above ``after`` (within ``window``, at least ``settle`` old), oldest first,
    each with its listing's *current* content (the merchant's corrections applied) and status, the
    product's merchant and external id, the stored image and the grounding box (``fallback`` true
    when the pipeline embedded the whole photo)."""
    return session.execute(_NEW_REVIEWED_LISTINGS, {"watermark": after, "window": window, "settle": settle,
                                                    "limit": limit}).all()


def datasets_named_like(session: Session, prefix: str, limit: int = 20) -> list[TrainingDataset]:
    """The newest datasets whose name starts with ``prefix`` (a builder's own)."""
    return list(session.scalars(select(TrainingDataset).where(TrainingDataset.name.startswith(prefix))
                                .order_by(TrainingDataset.id.desc()).limit(limit)))


def read_position_of(session: Session, builder: str) -> int:
    """``builder``'s own recorded read position (0 before its first run). Unlike ``read_position``
    it ignores the datasets' watermarks, which belong to the preference-pair builder."""
    return int(session.execute(text("SELECT coalesce((SELECT watermark FROM builder_watermarks "
                                     "WHERE builder = :b), 0)"), {"b": builder}).scalar_one())
