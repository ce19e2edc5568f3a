"""Closed value sets stored in text columns (checked by constraints in the migration)."""

from __future__ import annotations

from enum import StrEnum


class ListingStatus(StrEnum):
    proposed = "proposed"
    accepted = "accepted"
    edited = "edited"
    rejected = "rejected"


class ReviewDecision(StrEnum):
    accepted = "accepted"
    edited = "edited"
    rejected = "rejected"


class JobStatus(StrEnum):
    pending = "pending"
    running = "running"
    done = "done"
    failed = "failed"
    superseded = "superseded"  # a newer product version arrived before this one finished


class Stage(StrEnum):
    """Claimable pipeline stages, in order. Timings are finer (ground, describe, verify, embed)."""

    fetch = "fetch"  # fetch + dedup, CPU
    model = "model"  # ground → describe → verify → embed, GPU, micro-batched
    persist = "persist"  # one transaction + outbox, CPU


class InboxStatus(StrEnum):
    accepted = "accepted"
    rejected = "rejected"  # failed validation at intake: listing.failed invalid_event published
    stale = "stale"  # older product version than the one stored: no job


class PairDecision(StrEnum):
    """A merchant's verdict on a pair of images (``duplicate.reviewed``), honoured by every later dedup."""

    not_duplicate = "not_duplicate"  # never in one duplicate group again
    confirmed = "confirmed"  # in one group, whatever verification says


class ModelKind(StrEnum):
    detector = "detector"
    vlm = "vlm"
    clip = "clip"


class ModelStatus(StrEnum):
    candidate = "candidate"
    backfilling = "backfilling"
    active = "active"
    retired = "retired"


class EmbeddingKind(StrEnum):
    image = "image"
    text = "text"


class PairSource(StrEnum):
    merchant_correction = "merchant_correction"
    verification_drop = "verification_drop"


class DatasetSplit(StrEnum):
    train = "train"
    holdout = "holdout"


def check_in(column: str, enum: type[StrEnum]) -> str:
    values = ", ".join(f"'{m.value}'" for m in enum)
    return f"{column} IN ({values})"
