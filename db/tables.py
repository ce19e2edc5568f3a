"""Typed SQLAlchemy 2.0 tables for the whole design.

Every tenant-scoped row carries ``tenant_id``. Derived rows are keyed by (input identity, model
version) so re-processing is an idempotent upsert. Schema changes happen only in ``migrations/``.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pgvector.sqlalchemy import BIT, VECTOR
from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from db.base import Base, CreatedAt
from db.enums import (
    DatasetSplit,
    InboxStatus,
    JobStatus,
    ListingStatus,
    ModelKind,
    ModelStatus,
    PairDecision,
    PairSource,
    ReviewDecision,
    check_in,
)

TZ = DateTime(timezone=True)


class Tenant(CreatedAt, Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)


class Merchant(CreatedAt, Base):
    __tablename__ = "merchants"
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    id: Mapped[str] = mapped_column(String(128), primary_key=True)


class Product(CreatedAt, Base):
    """Latest known state of a merchant's product; ``version`` only moves forward."""

    __tablename__ = "products"
    __table_args__ = (
        UniqueConstraint("tenant_id", "external_id"),
        ForeignKeyConstraint(["tenant_id", "merchant_id"], ["merchants.tenant_id", "merchants.id"]),
        CheckConstraint("version >= 0", name="version_non_negative"),
    )
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), nullable=False)
    merchant_id: Mapped[str] = mapped_column(String(128), nullable=False)
    external_id: Mapped[str] = mapped_column(String(256), nullable=False)
    version: Mapped[int] = mapped_column(BigInteger, nullable=False)
    category: Mapped[str] = mapped_column(String(64), nullable=False)
    title: Mapped[str] = mapped_column(Text, nullable=False, server_default="")
    description: Mapped[str] = mapped_column(Text, nullable=False, server_default="")
    attributes: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default="{}")
    locale: Mapped[str] = mapped_column(String(16), nullable=False, server_default="en")
    updated_at: Mapped[datetime] = mapped_column(TZ, nullable=False, server_default=text("now()"))


class Image(CreatedAt, Base):
    """Content-addressed original: one row per (tenant, sha256)."""

    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("tenant_id", "sha256"),)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    phash: Mapped[str] = mapped_column(BIT(64), nullable=False)
    dhash: Mapped[str] = mapped_column(BIT(64), nullable=False)
    # Hashes of the image with uniform borders trimmed (letterboxing); NULL for rows stored before
    # migration 0009, which candidate search then compares by their plain hashes.
    phash_trimmed: Mapped[str | None] = mapped_column(BIT(64))
    dhash_trimmed: Mapped[str | None] = mapped_column(BIT(64))
    # Hashes of the trimmed image's central region (a re-coloured background); NULL as above.
    phash_centre: Mapped[str | None] = mapped_column(BIT(64))
    dhash_centre: Mapped[str | None] = mapped_column(BIT(64))
    width: Mapped[int] = mapped_column(Integer, nullable=False)
    height: Mapped[int] = mapped_column(Integer, nullable=False)
    byte_size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    format: Mapped[str] = mapped_column(String(16), nullable=False)
    storage_uri: Mapped[str] = mapped_column(Text, nullable=False)


class ProductImage(Base):
    __tablename__ = "product_images"
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), nullable=False)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id", ondelete="CASCADE"), primary_key=True)
    product_version: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    position: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), nullable=False, index=True)
    role: Mapped[str] = mapped_column(String(32), nullable=False, server_default="primary")
    source_url: Mapped[str] = mapped_column(Text, nullable=False)


class DuplicateGroup(CreatedAt, Base):
    __tablename__ = "duplicate_groups"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), nullable=False)
    representative_image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), nullable=False, unique=True)


class DuplicateMember(CreatedAt, Base):
    """An image's membership in a near/exact duplicate group, with the evidence that confirmed it."""

    __tablename__ = "duplicate_members"
    __table_args__ = (CheckConstraint("method IN ('exact', 'near', 'confirmed')", name="method"),)
    group_id: Mapped[int] = mapped_column(ForeignKey("duplicate_groups.id", ondelete="CASCADE"), primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), primary_key=True, unique=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), nullable=False)
    method: Mapped[str] = mapped_column(String(16), nullable=False)
    hamming_distance: Mapped[int | None] = mapped_column(SmallInteger)
    inliers: Mapped[int | None] = mapped_column(Integer)


class DuplicateDecision(CreatedAt, Base):
    """A merchant's current verdict on one pair of the tenant's images, keyed by their SHA-256 (the
    pair in sorted order), so it holds before, while and after the images are stored. The latest
    ``occurred_at`` wins; ``event_id`` is the ``duplicate.reviewed`` event that set it."""

    __tablename__ = "duplicate_decisions"
    __table_args__ = (
        UniqueConstraint("tenant_id", "image_a_sha256", "image_b_sha256"),
        CheckConstraint('image_a_sha256 COLLATE "C" < image_b_sha256 COLLATE "C"', name="pair_ordered"),
        CheckConstraint(check_in("decision", PairDecision), name="decision"),
        Index("ix_duplicate_decisions_tenant_id_image_b_sha256", "tenant_id", "image_b_sha256"),
    )
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), nullable=False)
    image_a_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    image_b_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    decision: Mapped[str] = mapped_column(String(16), nullable=False)
    event_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    occurred_at: Mapped[datetime] = mapped_column(TZ, nullable=False)
    merchant_id: Mapped[str] = mapped_column(String(128), nullable=False)
    reviewer: Mapped[str] = mapped_column(String(256), nullable=False)
    reason: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(TZ, nullable=False, server_default=text("now()"))


class ModelVersion(CreatedAt, Base):
    """A model that produced stored output. Platform-level (not tenant-scoped)."""

    __tablename__ = "model_versions"
    __table_args__ = (
        UniqueConstraint("kind", "name", "revision"),
        CheckConstraint(check_in("kind", ModelKind), name="kind"),
        CheckConstraint(check_in("status", ModelStatus), name="status"),
        Index("uq_model_versions_one_active", "kind", unique=True, postgresql_where=text("status = 'active'")),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    name: Mapped[str] = mapped_column(String(256), nullable=False)
    revision: Mapped[str] = mapped_column(String(128), nullable=False)
    profile: Mapped[str] = mapped_column(String(32), nullable=False)
    random_weights: Mapped[bool] = mapped_column(Boolean, nullable=False)
    dims: Mapped[int | None] = mapped_column(SmallInteger)
    status: Mapped[str] = mapped_column(String(16), nullable=False, server_default=ModelStatus.candidate.value)
    params: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default="{}")
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default="{}")
    activated_at: Mapped[datetime | None] = mapped_column(TZ)
    weights_uri: Mapped[str | None] = mapped_column(Text)  # what a worker loads; NULL for random-init builds


class Grounding(CreatedAt, Base):
    __tablename__ = "groundings"
    __table_args__ = (UniqueConstraint("tenant_id", "image_id", "model_version_id", "prompt"),)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), nullable=False)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), nullable=False)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), nullable=False)
    prompt: Mapped[str] = mapped_column(Text, nullable=False)
    box: Mapped[list[float] | None] = mapped_column(JSONB)  # [x0, y0, x1, y1] in original pixels
    score: Mapped[float | None] = mapped_column(Float)
    fallback: Mapped[bool] = mapped_column(Boolean, nullable=False)


class Listing(CreatedAt, Base):
    """One generated listing per (tenant, product, version, listing-model version)."""

    __tablename__ = "listings"
    __table_args__ = (
        UniqueConstraint("tenant_id", "product_id", "product_version", "model_version_id"),
        CheckConstraint(check_in("status", ListingStatus), name="status"),
    )
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), nullable=False)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id", ondelete="CASCADE"), nullable=False)
    product_version: Mapped[int] = mapped_column(BigInteger, nullable=False)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), nullable=False)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), nullable=False)
    grounding_id: Mapped[int | None] = mapped_column(ForeignKey("groundings.id"))
    category: Mapped[str] = mapped_column(String(64), nullable=False)
    schema_id: Mapped[str] = mapped_column(String(64), nullable=False)  # e.g. "dress@1"
    content: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)  # title, description, attributes
    generated_content: Mapped[dict[str, Any] | None] = mapped_column(JSONB)  # as generated, once a merchant edited
    dropped_attributes: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default="{}")
    model_output: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)  # raw schema-valid VLM JSON
    model_input: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)  # exact prompt, for DPO
    model_versions: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    random_weights: Mapped[bool] = mapped_column(Boolean, nullable=False)
    # Migration 0008: fields finished past the token budget, merchant/image conflicts, truth check.
    forced_fields: Mapped[list[str]] = mapped_column(JSONB, nullable=False, server_default="[]")
    forced_tokens: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    conflicts: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, nullable=False, server_default="[]")
    text_checks: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default="{}")
    status: Mapped[str] = mapped_column(String(16), nullable=False, server_default=ListingStatus.proposed.value)
    reviewed_at: Mapped[datetime | None] = mapped_column(TZ)


class Embedding(CreatedAt, Base):
    """CLIP image + text vectors of one listing under one embedding-model version.

    Vector columns have no fixed dimension so several model versions (of any size) live side
    by side; HNSW indexes are partial per dimension (see the migrations).
    """

    __tablename__ = "embeddings"
    __table_args__ = (UniqueConstraint("listing_id", "model_version_id"),)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), nullable=False)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id", ondelete="CASCADE"), nullable=False)
    listing_id: Mapped[int] = mapped_column(ForeignKey("listings.id", ondelete="CASCADE"), nullable=False)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), nullable=False)
    category: Mapped[str] = mapped_column(String(64), nullable=False)
    dims: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    image_embedding: Mapped[Any] = mapped_column(VECTOR(), nullable=False)
    text_embedding: Mapped[Any] = mapped_column(VECTOR(), nullable=False)
    text_input: Mapped[str] = mapped_column(Text, nullable=False)


class PhotoEmbedding(CreatedAt, Base):
    """One photo of a listing's product under one clip version (migration 0011): its own vector, and
    whether it shows the product (only those enter the product vector in ``embeddings``)."""

    __tablename__ = "photo_embeddings"
    __table_args__ = (UniqueConstraint("listing_id", "image_id", "model_version_id"),
                      Index("ix_photo_embeddings_tenant_id_image_id", "tenant_id", "image_id"))
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), nullable=False)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id", ondelete="CASCADE"), nullable=False)
    listing_id: Mapped[int] = mapped_column(ForeignKey("listings.id", ondelete="CASCADE"), nullable=False)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), nullable=False)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), nullable=False)
    position: Mapped[int] = mapped_column(SmallInteger, nullable=False)  # 0 = the primary photo
    on_product: Mapped[bool] = mapped_column(Boolean, nullable=False)
    product_probability: Mapped[float | None] = mapped_column(Float)
    grounding_id: Mapped[int | None] = mapped_column(ForeignKey("groundings.id"))
    dims: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    embedding: Mapped[Any] = mapped_column(VECTOR(), nullable=False)


class InboxEvent(Base):
    """Every event id ever received: a redelivered or re-published event is a no-op."""

    __tablename__ = "inbox_events"
    __table_args__ = (
        CheckConstraint(check_in("status", InboxStatus), name="status"),
        Index("ix_inbox_events_received_at_event_id", "received_at", "event_id"),
    )
    event_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    tenant_id: Mapped[str | None] = mapped_column(String(128))  # unknown when the event was invalid
    event_type: Mapped[str] = mapped_column(String(64), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    detail: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(TZ, nullable=False, server_default=text("now()"))


class EnrichmentJob(CreatedAt, Base):
    """Per accepted product event: ends in done or failed-with-code, exactly once."""

    __tablename__ = "enrichment_jobs"
    __table_args__ = (
        CheckConstraint(check_in("status", JobStatus), name="status"),
        CheckConstraint("status <> 'failed' OR error_code IS NOT NULL", name="failed_has_code"),
        Index("ix_enrichment_jobs_status", "status"),
        Index("ix_enrichment_jobs_finished_at_id", "finished_at", "id", postgresql_where=text("finished_at IS NOT NULL")),
    )
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), nullable=False)
    event_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("inbox_events.event_id"), nullable=False, unique=True)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id", ondelete="CASCADE"), nullable=False)
    product_version: Mapped[int] = mapped_column(BigInteger, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, server_default=JobStatus.pending.value)
    stage: Mapped[str | None] = mapped_column(String(16))
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_detail: Mapped[str | None] = mapped_column(Text)
    retryable: Mapped[bool | None] = mapped_column(Boolean)
    attempts: Mapped[dict[str, int]] = mapped_column(JSONB, nullable=False, server_default="{}")
    timings_ms: Mapped[dict[str, float]] = mapped_column(JSONB, nullable=False, server_default="{}")
    work: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default="{}")  # ids between stages
    listing_id: Mapped[int | None] = mapped_column(ForeignKey("listings.id", ondelete="SET NULL"))
    updated_at: Mapped[datetime] = mapped_column(TZ, nullable=False, server_default=text("now()"))
    finished_at: Mapped[datetime | None] = mapped_column(TZ)


class OutboxMessage(CreatedAt, Base):
    """Domain events written in the same transaction as their cause, published after commit."""

    __tablename__ = "outbox"
    __table_args__ = (
        Index("ix_outbox_unpublished", "id", postgresql_where=text("published_at IS NULL")),
        Index("ix_outbox_published_at", "published_at", postgresql_where=text("published_at IS NOT NULL")),
    )
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str | None] = mapped_column(String(128))
    message_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False, unique=True)
    routing_key: Mapped[str] = mapped_column(String(64), nullable=False)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    published_at: Mapped[datetime | None] = mapped_column(TZ)
    publish_attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")


class DeadLetter(CreatedAt, Base):
    """Messages given up on, kept by the application (brokers without dead-lettering, e.g. Redis,
    and a record beside the broker's dead-letter queue on RabbitMQ)."""

    __tablename__ = "dead_letters"
    __table_args__ = (
        CheckConstraint("resolution IS NULL OR resolution IN ('replayed', 'discarded')", name="resolution"),
        CheckConstraint("(resolution IS NULL) = (resolved_at IS NULL)", name="resolved_together"),
        Index("ix_dead_letters_resolved_at", "resolved_at", postgresql_where=text("resolved_at IS NOT NULL")),
        Index("ix_dead_letters_unresolved", "id", postgresql_where=text("resolved_at IS NULL")),
    )
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str | None] = mapped_column(String(128))
    queue: Mapped[str] = mapped_column(String(128), nullable=False)
    routing_key: Mapped[str | None] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(String(64), nullable=False)
    detail: Mapped[str | None] = mapped_column(Text)
    headers: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default="{}")
    body: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    # Kept until resolved (enrich dead-letters replay|discard), then pruned after a grace period.
    resolved_at: Mapped[datetime | None] = mapped_column(TZ)
    resolution: Mapped[str | None] = mapped_column(String(16))  # 'replayed' | 'discarded'


class ReviewFeedback(CreatedAt, Base):
    __tablename__ = "review_feedback"
    __table_args__ = (CheckConstraint(check_in("decision", ReviewDecision), name="decision"),)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), nullable=False)
    event_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False, unique=True)
    listing_id: Mapped[int] = mapped_column(ForeignKey("listings.id", ondelete="CASCADE"), nullable=False)
    decision: Mapped[str] = mapped_column(String(16), nullable=False)
    reviewer: Mapped[str] = mapped_column(String(256), nullable=False)
    reason: Mapped[str | None] = mapped_column(Text)
    corrected: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default="{}")


class FieldError(CreatedAt, Base):
    """One wrong field of one reviewed listing: what the model said, what the merchant said."""

    __tablename__ = "field_errors"
    __table_args__ = (UniqueConstraint("feedback_id", "field"),)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), nullable=False)
    feedback_id: Mapped[int] = mapped_column(ForeignKey("review_feedback.id", ondelete="CASCADE"), nullable=False)
    listing_id: Mapped[int] = mapped_column(ForeignKey("listings.id", ondelete="CASCADE"), nullable=False)
    category: Mapped[str] = mapped_column(String(64), nullable=False)
    field: Mapped[str] = mapped_column(String(128), nullable=False)
    model_value: Mapped[Any] = mapped_column(JSONB)
    merchant_value: Mapped[Any] = mapped_column(JSONB)
    model_versions: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)


class TrainingDataset(CreatedAt, Base):
    """A versioned DPO dataset written by the retrain task. Platform-level."""

    __tablename__ = "training_datasets"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), nullable=False, unique=True)
    uri: Mapped[str] = mapped_column(Text, nullable=False)
    content_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    manifest: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    watermark_feedback_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    window_start: Mapped[datetime | None] = mapped_column(TZ)
    window_end: Mapped[datetime] = mapped_column(TZ, nullable=False)


class BuilderWatermark(Base):
    """How far a periodic builder has read its input (the pair builder: the last feedback id it
    examined), advanced even when a run yields nothing, so no run re-reads what it already judged."""

    __tablename__ = "builder_watermarks"
    builder: Mapped[str] = mapped_column(String(64), primary_key=True)
    watermark: Mapped[int] = mapped_column(BigInteger, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(TZ, nullable=False, server_default=text("now()"))


class PreferencePair(CreatedAt, Base):
    __tablename__ = "preference_pairs"
    __table_args__ = (
        CheckConstraint(check_in("source", PairSource), name="source"),
        CheckConstraint(check_in("split", DatasetSplit), name="split"),
    )
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), nullable=False)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("training_datasets.id", ondelete="CASCADE"), nullable=False)
    listing_id: Mapped[int] = mapped_column(ForeignKey("listings.id", ondelete="CASCADE"), nullable=False)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id", ondelete="CASCADE"), nullable=False)
    merchant_id: Mapped[str] = mapped_column(String(128), nullable=False)
    category: Mapped[str] = mapped_column(String(64), nullable=False)
    source: Mapped[str] = mapped_column(String(32), nullable=False)
    split: Mapped[str] = mapped_column(String(16), nullable=False)
    pair_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    prompt: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    chosen: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    rejected: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)


class JobSummary(Base):
    """Finished jobs folded into hourly counts when the pruner deletes them (migration 0010).
    Platform-level: ``enrich status`` adds these to the live rows."""

    __tablename__ = "job_summaries"
    hour: Mapped[datetime] = mapped_column(TZ, primary_key=True)  # the hour (UTC) the jobs finished in
    status: Mapped[str] = mapped_column(String(16), primary_key=True)
    error_code: Mapped[str] = mapped_column(String(64), primary_key=True, server_default="")
    jobs: Mapped[int] = mapped_column(BigInteger, nullable=False)


class JobStageTiming(Base):
    """One bucket of an hourly stage-timing histogram of pruned jobs: how many timings of ``stage``
    fell at or below ``le_ms`` (and above the next lower bound), and their sum."""

    __tablename__ = "job_stage_timings"
    hour: Mapped[datetime] = mapped_column(TZ, primary_key=True)
    stage: Mapped[str] = mapped_column(String(32), primary_key=True)
    le_ms: Mapped[float] = mapped_column(Float, primary_key=True)  # 'Infinity' for the overflow bucket
    jobs: Mapped[int] = mapped_column(BigInteger, nullable=False)
    sum_ms: Mapped[float] = mapped_column(Float, nullable=False)


class InboxSummary(Base):
    """Pruned inbox rows as hourly counts by event type and outcome."""

    __tablename__ = "inbox_summaries"
    hour: Mapped[datetime] = mapped_column(TZ, primary_key=True)
    event_type: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), primary_key=True)
    events: Mapped[int] = mapped_column(BigInteger, nullable=False)


class RetentionCursor(Base):
    """How far a pruning pass has read an ordered input: finished jobs by (finished_at, id), inbox
    events by (received_at, event_id)."""

    __tablename__ = "retention_cursors"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    position_at: Mapped[datetime] = mapped_column(TZ, nullable=False)
    position_key: Mapped[str] = mapped_column(String(64), nullable=False)  # the tie-breaking key, as text
    updated_at: Mapped[datetime] = mapped_column(TZ, nullable=False, server_default=text("now()"))


TENANT_SCOPED_TABLES = [
    t.name for t in Base.metadata.sorted_tables if "tenant_id" in t.c and t.name != "tenants"
]
