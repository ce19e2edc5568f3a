"""What the report shows, read from the database in one maintenance transaction (no image bytes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy.orm import Session, sessionmaker

from db import similarity
from db.engine import admin_session
from db.repositories import report_views as views
from db.repositories.report_views import GroupMember, ListedProduct, StageTiming, StoredPhoto, Throughput
from workers.cli.errors import CliError


@dataclass(frozen=True)
class Duplicate:
    """Another image in a duplicate group with one of this product's photos, or this photo itself
    used by other products (an exact duplicate is one image row shared by products)."""

    own: StoredPhoto
    other: StoredPhoto
    method: str
    hamming_distance: int | None
    inliers: int | None
    products: list[str]
    decision: str | None


@dataclass(frozen=True)
class Neighbour:
    external_id: str
    distance: float
    category: str
    title: str
    photo: StoredPhoto | None


@dataclass
class ProductEntry:
    listed: ListedProduct
    photos: list[tuple[str, StoredPhoto]]  # (role, photo), in the product's order
    duplicates: list[Duplicate] = field(default_factory=list)
    neighbours: list[Neighbour] = field(default_factory=list)
    neighbours_note: str = ""


@dataclass(frozen=True)
class Summary:
    tenant: str | None
    tenants: list[str]
    products: int
    listed: int
    shown: int
    jobs_by_status: dict[str, int]
    failures_by_code: dict[str, int]
    throughput: Throughput
    stages: list[StageTiming]
    generated_at: datetime


@dataclass(frozen=True)
class Catalogue:
    summary: Summary
    entries: list[ProductEntry]


def gather(factory: sessionmaker[Session], tenant: str | None, *, limit: int, neighbours: int) -> Catalogue:
    """The report's rows: ``tenant``'s enriched products (every tenant's when ``None``), at most
    ``limit``, each with its ``neighbours`` nearest products. A tenant that does not exist and a
    catalogue with nothing enriched are ``CliError``s that say so."""
    with admin_session(factory) as session:
        known = views.tenant_ids(session)
        if tenant is not None and tenant not in known:
            listed = ", ".join(known[:20]) + (" …" if len(known) > 20 else "") if known else "none yet"
            raise CliError(f"tenant {tenant!r} not found (tenants: {listed})")
        listed = views.listed_products(session, tenant, limit=limit)
        summary = _summary(session, tenant, known, shown=len(listed))
        if not listed:
            where = f"tenant {tenant!r}" if tenant else "the catalogue"
            jobs = ", ".join(f"{s} {n}" for s, n in summary.jobs_by_status.items()) or "none"
            raise CliError(f"{where} has no enriched products yet ({summary.products} products; jobs: {jobs}); "
                           "nothing to report")
        entries = _entries(session, tenant, listed)
        _add_neighbours(session, entries, neighbours)
    return Catalogue(summary, entries)


def _summary(session: Session, tenant: str | None, known: list[str], *, shown: int) -> Summary:
    by_status: dict[str, int] = {}
    failures: dict[str, int] = {}
    for status, code, n in views.job_outcomes(session, tenant):
        by_status[status] = by_status.get(status, 0) + n
        if status == "failed":
            failures[code or "unknown"] = failures.get(code or "unknown", 0) + n
    return Summary(tenant=tenant, tenants=[tenant] if tenant else known, products=views.count_products(session, tenant),
                   listed=views.count_listed(session, tenant), shown=shown, jobs_by_status=by_status,
                   failures_by_code=failures, throughput=views.throughput(session, tenant),
                   stages=views.stage_timings(session, tenant), generated_at=datetime.now(UTC))


def _entries(session: Session, tenant: str | None, listed: list[ListedProduct]) -> list[ProductEntry]:
    by_product: dict[int, list[tuple[str, StoredPhoto]]] = {}
    for p in views.product_photos(session, {lp.product_id: lp.product_version for lp in listed}):
        by_product.setdefault(p.product_id, []).append((p.role, p.photo))
    missing = [lp.image_id for lp in listed
               if lp.image_id not in {ph.image_id for _, ph in by_product.get(lp.product_id, [])}]
    extra = views.photos(session, missing) if missing else {}
    entries = []
    for lp in listed:
        photos = by_product.get(lp.product_id, [])
        if lp.image_id in extra:  # a reused listing may name an image this version no longer links
            photos = [("listing", extra[lp.image_id]), *photos]
        entries.append(ProductEntry(lp, photos))
    members = views.group_members(session, tenant, sorted({ph.image_id for e in entries for _, ph in e.photos}))
    for entry in entries:
        entry.duplicates = _duplicates(entry, members)
    return entries


def _duplicates(entry: ProductEntry, members: list[GroupMember]) -> list[Duplicate]:
    own = {ph.image_id: ph for _, ph in entry.photos}
    out: list[Duplicate] = []
    for m in members:
        if m.of_image_id not in own:
            continue
        if m.photo.image_id == m.of_image_id:
            others = [p for p in m.products if p != entry.listed.external_id]
            if others:  # the same bytes, used by other products
                out.append(Duplicate(own[m.of_image_id], m.photo, "exact", 0, None, others, m.decision))
            continue
        if m.photo.image_id in own:
            continue  # two photos of this very product
        out.append(Duplicate(own[m.of_image_id], m.photo, m.method, m.hamming_distance, m.inliers,
                             m.products, m.decision))
    return out


def _add_neighbours(session: Session, entries: list[ProductEntry], k: int) -> None:
    if k <= 0:
        return
    found: dict[int, list[similarity.SimilarProduct]] = {}
    for entry in entries:
        lp = entry.listed
        try:
            found[lp.product_id] = similarity.similar_products(session, lp.tenant_id, lp.external_id, k=k)
        except similarity.NoActiveEmbeddingModel:
            for e in entries:
                e.neighbours_note = "no active clip model: nothing to compare with"
            return
        except similarity.SearchError as exc:
            entry.neighbours_note = f"similarity search refused: {exc}"
            continue
        if not found[lp.product_id]:
            entry.neighbours_note = "not embedded yet"
    _attach_photos(session, entries, found)


def _attach_photos(session: Session, entries: list[ProductEntry],
                   found: dict[int, list[similarity.SimilarProduct]]) -> None:
    """Each neighbour's listing photo: from the entries when it is in the report, else looked up."""
    shown = {(e.listed.tenant_id, e.listed.external_id): e for e in entries}
    wanted: dict[str, set[str]] = {}
    for entry in entries:
        for s in found.get(entry.listed.product_id, []):
            if (entry.listed.tenant_id, s.external_id) not in shown:
                wanted.setdefault(entry.listed.tenant_id, set()).add(s.external_id)
    looked_up: dict[tuple[str, str], int] = {}
    for tenant, ids in wanted.items():
        for lp in views.listed_products(session, tenant, limit=len(ids), external_ids=sorted(ids)):
            looked_up[(tenant, lp.external_id)] = lp.image_id
    extra = views.photos(session, list(looked_up.values())) if looked_up else {}
    for entry in entries:
        for s in found.get(entry.listed.product_id, []):
            key = (entry.listed.tenant_id, s.external_id)
            photo = None
            if key in shown:
                photo = next((ph for _, ph in shown[key].photos if ph.image_id == shown[key].listed.image_id), None)
            elif key in looked_up:
                photo = extra.get(looked_up[key])
            entry.neighbours.append(Neighbour(s.external_id, float(s.distance), s.category, s.title, photo))
