"""What each stage hands the next, as typed records: the only code that reads or writes ``job.work``.

``enrichment_jobs.work`` is one JSONB document per job. Its keys are written here and nowhere
else: intake writes the request, fetch adds what it learned, the model stage adds its result URI,
and claims are kept by ``tasks.pipeline.jobs``. Each record has ``to_work()`` (the keys it
contributes) and ``of(job_work)`` (read back, with a clear error when a stage runs before the
one that should have fed it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tasks.events import ProductImageRef


class MissingHandoff(KeyError):
    """A stage ran before the stage that writes its input (a bug, never a delivery race)."""


def _need(work: dict[str, Any], key: str, record: str) -> Any:
    if key not in work:
        raise MissingHandoff(f"job work has no {key!r}: {record} was never written")
    return work[key]


ImageRef = ProductImageRef  # one image of a product version: its URL and role, as the event named it


@dataclass(frozen=True)
class EnrichRequest:
    """Intake (or the reconciler) → fetch: the product version's images, in event order."""

    images: tuple[ImageRef, ...]
    reconciled: str | None = None  # why the reconciler re-ran this product version, if it did
    stages_hint: tuple[str, ...] | None = None  # the event's hints.stages (tasks.pipeline.policy), if any

    def to_work(self) -> dict[str, Any]:
        out: dict[str, Any] = {"image_urls": [[i.url, i.role] for i in self.images]}
        if self.reconciled is not None:
            out["reconciled"] = self.reconciled
        if self.stages_hint is not None:
            out["stages_hint"] = list(self.stages_hint)
        return out

    @staticmethod
    def present(work: dict[str, Any]) -> bool:
        return "image_urls" in work

    @classmethod
    def of(cls, work: dict[str, Any]) -> EnrichRequest:
        urls = _need(work, "image_urls", "the enrich request")
        hint = work.get("stages_hint")
        return cls(tuple(ImageRef(url, role) for url, role in urls), work.get("reconciled"),
                   tuple(hint) if hint is not None else None)


@dataclass(frozen=True)
class DuplicateFound:
    """One image of this product that another product in the tenant already has."""

    image_url: str
    kind: str  # exact | near
    duplicate_of_product: str | None
    hamming_distance: int
    inliers: int | None

    def as_event(self) -> dict[str, Any]:
        return {"image_url": self.image_url, "kind": self.kind, "duplicate_of_product": self.duplicate_of_product,
                "hamming_distance": self.hamming_distance, "inliers": self.inliers}


@dataclass(frozen=True)
class FetchedImages:
    """Fetch → model (or straight to persist when a listing can be reused)."""

    image_ids: tuple[int, ...]
    primary_image_id: int
    primary_uri: str
    duplicates: tuple[DuplicateFound, ...] = ()
    reuse_listing_id: int | None = None
    reuse_key: str | None = None  # the inputs besides image and models (tasks.pipeline.reuse), kept on the listing
    image_uris: tuple[str, ...] = ()  # parallel to image_ids (a hand-off written before it: the primary only)

    def to_work(self) -> dict[str, Any]:
        return {"image_ids": list(self.image_ids), "primary_image_id": self.primary_image_id,
                "primary_uri": self.primary_uri, "duplicates": [d.as_event() for d in self.duplicates],
                "image_uris": list(self.image_uris),
                "reuse_listing_id": self.reuse_listing_id, "reuse_key": self.reuse_key}

    @classmethod
    def of(cls, work: dict[str, Any]) -> FetchedImages:
        return cls(image_ids=tuple(_need(work, "image_ids", "the fetch hand-off")),
                   primary_image_id=int(_need(work, "primary_image_id", "the fetch hand-off")),
                   primary_uri=str(_need(work, "primary_uri", "the fetch hand-off")),
                   duplicates=tuple(DuplicateFound(**d) for d in work.get("duplicates", [])),
                   reuse_listing_id=work.get("reuse_listing_id"), reuse_key=work.get("reuse_key"),
                   image_uris=tuple(work.get("image_uris") or ()))

    def photos(self, limit: int) -> list[tuple[int, str]]:
        """(image id, uri) of the photos the model stage reads: the primary first, then the others
        in the event's order, at most ``limit``."""
        if len(self.image_uris) != len(self.image_ids):
            return [(self.primary_image_id, self.primary_uri)]
        others = list(dict.fromkeys((i, u) for i, u in zip(self.image_ids, self.image_uris, strict=True)
                                    if i != self.primary_image_id))
        return [(self.primary_image_id, self.primary_uri), *others][:max(1, limit)]


@dataclass(frozen=True)
class ModelOutput:
    """Model → persist: where the result document (listing, grounding, vectors) is stored."""

    result_uri: str

    def to_work(self) -> dict[str, Any]:
        return {"result_uri": self.result_uri}

    @classmethod
    def of(cls, work: dict[str, Any]) -> ModelOutput:
        return cls(str(_need(work, "result_uri", "the model hand-off")))


@dataclass(frozen=True)
class JobTrace:
    """Intake → every stage: the W3C trace context the product event arrived with (if any)."""

    traceparent: str
    tracestate: str | None = None

    def to_work(self) -> dict[str, Any]:
        return {"trace": {"traceparent": self.traceparent, "tracestate": self.tracestate}}

    @classmethod
    def of(cls, work: dict[str, Any]) -> JobTrace | None:
        trace = work.get("trace") or {}
        return cls(trace["traceparent"], trace.get("tracestate")) if trace.get("traceparent") else None


@dataclass(frozen=True)
class Claims:
    """Which task id holds each stage of the job (``tasks.pipeline.jobs.claim``)."""

    by_stage: dict[str, str] = field(default_factory=dict)

    def holder(self, stage: str) -> str | None:
        return self.by_stage.get(stage)

    def with_holder(self, stage: str, task_id: str) -> Claims:
        return Claims({**self.by_stage, stage: task_id})

    def to_work(self) -> dict[str, Any]:
        return {"claims": dict(self.by_stage)}

    @classmethod
    def of(cls, work: dict[str, Any]) -> Claims:
        return cls(dict(work.get("claims", {})))
