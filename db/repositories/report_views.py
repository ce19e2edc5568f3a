"""Read-only queries behind ``enrich report``: each enriched product with its photos, grounding,
attributes and duplicates, and the job figures of the summary.

Every function takes ``tenant`` (``None``: every tenant) and filters on it in SQL, whatever the
transaction's row-level-security scope: the report runs as the maintenance role in the system
scope, which sees every tenant, and a superuser login would bypass the policies altogether. The
nearest products come from ``catalog.similar_products`` (``db.similarity``); the per-product
job counts of ``enrich status`` are platform-wide and live in ``db.repositories.reports``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

_TENANT = "(CAST(:tenant AS text) IS NULL OR {col} = CAST(:tenant AS text))"


@dataclass(frozen=True)
class ListedProduct:
    """A product's current listing (``catalog.current_listings``) with its grounding."""

    tenant_id: str
    external_id: str
    product_id: int
    product_version: int
    merchant_id: str
    category: str
    listing_id: int
    status: str
    content: dict[str, Any]
    dropped_attributes: dict[str, Any]
    conflicts: list[dict[str, Any]]
    forced_fields: list[str]
    random_weights: bool
    image_id: int
    box: list[float] | None
    score: float | None
    fallback: bool
    prompt: str


@dataclass(frozen=True)
class StoredPhoto:
    """One stored original: where it is and its size after EXIF orientation (the box's pixels)."""

    image_id: int
    sha256: str
    width: int
    height: int
    storage_uri: str


@dataclass(frozen=True)
class ProductPhoto:
    product_id: int
    position: int
    role: str
    photo: StoredPhoto


@dataclass(frozen=True)
class GroupMember:
    """A member of a duplicate group holding ``of_image_id`` (that image itself included)."""

    of_image_id: int
    group_id: int
    method: str
    hamming_distance: int | None
    inliers: int | None
    products: list[str]
    decision: str | None
    photo: StoredPhoto


@dataclass(frozen=True)
class StageTiming:
    stage: str
    jobs: int
    mean_ms: float
    p50_ms: float
    p95_ms: float


@dataclass(frozen=True)
class Throughput:
    done: int
    first_created: datetime | None
    last_finished: datetime | None

    @property
    def span_s(self) -> float:
        if not (self.first_created and self.last_finished):
            return 0.0
        return max((self.last_finished - self.first_created).total_seconds(), 0.0)

    @property
    def per_s(self) -> float:
        return round(self.done / self.span_s, 3) if self.done and self.span_s else 0.0


def tenant_ids(session: Session) -> list[str]:
    return list(session.execute(text("SELECT id FROM tenants ORDER BY id")).scalars())


def listed_products(session: Session, tenant: str | None, *, limit: int,
                    external_ids: Sequence[str] | None = None) -> list[ListedProduct]:
    """Products with a current listing, by tenant and external id (at most ``limit``); only
    ``external_ids`` when given."""
    rows = session.execute(text(
        "SELECT cl.tenant_id, cl.external_id, cl.product_id, cl.product_version, p.merchant_id, cl.category, "
        "       cl.listing_id, cl.status, cl.content, l.dropped_attributes, l.conflicts, l.forced_fields, "
        "       cl.random_weights, l.image_id, g.box, g.score, coalesce(g.fallback, true) AS fallback, "
        "       coalesce(g.prompt, '') AS prompt "
        "FROM catalog.current_listings cl "
        "JOIN listings l ON l.id = cl.listing_id "
        "JOIN products p ON p.id = cl.product_id "
        "LEFT JOIN groundings g ON g.id = l.grounding_id "
        f"WHERE {_TENANT.format(col='cl.tenant_id')} "
        "  AND (CAST(:ids AS text[]) IS NULL OR cl.external_id = ANY(CAST(:ids AS text[]))) "
        "ORDER BY cl.tenant_id, cl.external_id LIMIT :limit"),
        {"tenant": tenant, "limit": limit, "ids": list(external_ids) if external_ids is not None else None}).all()
    return [ListedProduct(**r._asdict()) for r in rows]


def count_listed(session: Session, tenant: str | None) -> int:
    return session.execute(text(
        f"SELECT count(*) FROM catalog.current_listings cl WHERE {_TENANT.format(col='cl.tenant_id')}"),
        {"tenant": tenant}).scalar_one()


def count_products(session: Session, tenant: str | None) -> int:
    return session.execute(text(
        f"SELECT count(*) FROM products p WHERE {_TENANT.format(col='p.tenant_id')}"), {"tenant": tenant}).scalar_one()


def product_photos(session: Session, versions: dict[int, int]) -> list[ProductPhoto]:
    """The photos of each product at the given version (``{product_id: version}``), in order."""
    rows = session.execute(text(
        "SELECT pi.product_id, pi.position, pi.role, i.id AS image_id, i.sha256, i.width, i.height, i.storage_uri "
        "FROM unnest(CAST(:pids AS bigint[]), CAST(:vers AS bigint[])) AS v(pid, ver) "
        "JOIN product_images pi ON pi.product_id = v.pid AND pi.product_version = v.ver "
        "JOIN images i ON i.id = pi.image_id "
        "ORDER BY pi.product_id, pi.position"),
        {"pids": list(versions), "vers": list(versions.values())}).all()
    return [ProductPhoto(r.product_id, r.position, r.role,
                         StoredPhoto(r.image_id, r.sha256, r.width, r.height, r.storage_uri)) for r in rows]


def photos(session: Session, image_ids: Sequence[int]) -> dict[int, StoredPhoto]:
    rows = session.execute(text(
        "SELECT id AS image_id, sha256, width, height, storage_uri FROM images WHERE id = ANY(CAST(:ids AS bigint[]))"),
        {"ids": list(image_ids)}).all()
    return {r.image_id: StoredPhoto(**r._asdict()) for r in rows}


def group_members(session: Session, tenant: str | None, image_ids: Sequence[int]) -> list[GroupMember]:
    """Every member of the duplicate groups (``catalog.duplicate_groups``) holding one of
    ``image_ids``, with the products using it and its decided pair with the representative."""
    rows = session.execute(text(
        "SELECT own.id AS of_image_id, dg.group_id, m ->> 'method' AS method, "
        "       CAST(m ->> 'hamming_distance' AS integer) AS hamming_distance, "
        "       CAST(m ->> 'inliers' AS integer) AS inliers, m -> 'products' AS products, "
        "       m ->> 'decision' AS decision, i.id AS image_id, i.sha256, i.width, i.height, i.storage_uri "
        "FROM unnest(CAST(:ids AS bigint[])) AS own(id) "
        "JOIN catalog.duplicate_groups dg "
        "  ON dg.members @> jsonb_build_array(jsonb_build_object('image_id', own.id)) "
        "CROSS JOIN LATERAL jsonb_array_elements(dg.members) AS m "
        "JOIN images i ON i.id = CAST(m ->> 'image_id' AS bigint) "
        f"WHERE {_TENANT.format(col='dg.tenant_id')} "
        "ORDER BY own.id, dg.group_id, i.id"),
        {"ids": list(image_ids), "tenant": tenant}).all()
    return [GroupMember(r.of_image_id, r.group_id, r.method, r.hamming_distance, r.inliers, list(r.products or []),
                        r.decision, StoredPhoto(r.image_id, r.sha256, r.width, r.height, r.storage_uri))
            for r in rows]


def job_outcomes(session: Session, tenant: str | None) -> list[tuple[str, str | None, int]]:
    """(status, error code, jobs) over the live job rows, most frequent first."""
    return [tuple(r) for r in session.execute(text(
        "SELECT status, error_code, count(*) AS n FROM enrichment_jobs j "
        f"WHERE {_TENANT.format(col='j.tenant_id')} GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2"),
        {"tenant": tenant}).all()]


def throughput(session: Session, tenant: str | None) -> Throughput:
    """Jobs done, from the first one's creation to the last one's finish."""
    row = session.execute(text(
        "SELECT count(*) AS done, min(created_at) AS first_created, max(finished_at) AS last_finished "
        f"FROM enrichment_jobs j WHERE status = 'done' AND {_TENANT.format(col='j.tenant_id')}"),
        {"tenant": tenant}).one()
    return Throughput(row.done, row.first_created, row.last_finished)


def stage_timings(session: Session, tenant: str | None) -> list[StageTiming]:
    """Per stage key of the done jobs' ``timings_ms``: jobs, mean, p50 and p95 milliseconds."""
    rows = session.execute(text(
        "SELECT e.key AS stage, count(*) AS jobs, avg(CAST(e.value AS float8)) AS mean_ms, "
        "       percentile_cont(0.5) WITHIN GROUP (ORDER BY CAST(e.value AS float8)) AS p50_ms, "
        "       percentile_cont(0.95) WITHIN GROUP (ORDER BY CAST(e.value AS float8)) AS p95_ms "
        "FROM enrichment_jobs j CROSS JOIN LATERAL jsonb_each(j.timings_ms) AS e "
        f"WHERE j.status = 'done' AND jsonb_typeof(e.value) = 'number' AND {_TENANT.format(col='j.tenant_id')} "
        "GROUP BY 1 ORDER BY 1"), {"tenant": tenant}).all()
    return [StageTiming(r.stage, r.jobs, float(r.mean_ms), float(r.p50_ms), float(r.p95_ms)) for r in rows]
