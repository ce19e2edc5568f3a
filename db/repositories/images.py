"""Images: content-addressed rows per tenant, their use by products, near-duplicate candidates and
the exact/near duplicate groups."""

from __future__ import annotations

from dataclasses import dataclass

from pgvector.sqlalchemy import BIT
from sqlalchemy import cast, delete, func, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from db.tables import DuplicateGroup, DuplicateMember, Image, Product, ProductImage


@dataclass(frozen=True)
class NewImage:
    sha256: str
    phash: str
    dhash: str
    width: int
    height: int
    byte_size: int
    format: str
    storage_uri: str
    phash_trimmed: str | None = None  # hashes of the image with uniform borders cut (models.hashing)
    dhash_trimmed: str | None = None
    phash_centre: str | None = None  # hashes of the trimmed image's central region (models.hashing)
    dhash_centre: str | None = None


@dataclass(frozen=True)
class NearCandidate:
    image_id: int
    storage_uri: str
    hamming: int  # the smaller of the pHash and dHash distances
    sha256: str = ""


def upsert(session: Session, tenant_id: str, image: NewImage) -> tuple[int, bool]:
    """(image id, is_new). The same bytes are one row per tenant."""
    new_id = session.execute(
        insert(Image).values(tenant_id=tenant_id, sha256=image.sha256, phash=image.phash, dhash=image.dhash,
                             phash_trimmed=image.phash_trimmed, dhash_trimmed=image.dhash_trimmed,
                             phash_centre=image.phash_centre, dhash_centre=image.dhash_centre,
                             width=image.width, height=image.height, byte_size=image.byte_size,
                             format=image.format, storage_uri=image.storage_uri)
        .on_conflict_do_nothing(index_elements=["tenant_id", "sha256"]).returning(Image.id)
    ).scalar_one_or_none()
    if new_id is not None:
        return new_id, True
    existing = session.scalar(select(Image.id).where(Image.tenant_id == tenant_id, Image.sha256 == image.sha256))
    assert existing is not None
    return existing, False


def link_to_product(session: Session, *, tenant_id: str, product_id: int, product_version: int, position: int,
                    image_id: int, role: str, source_url: str) -> None:
    session.execute(insert(ProductImage).values(
        tenant_id=tenant_id, product_id=product_id, product_version=product_version, position=position,
        image_id=image_id, role=role, source_url=source_url[:2048]).on_conflict_do_nothing())


# Hamming candidate search. The HNSW indexes on phash/dhash are global (every tenant in one graph),
# and a tenant filter applied after an HNSW scan loses the tenant's real copy once other tenants'
# look-alike hashes crowd the query: without an iterative scan the index hands back about
# ef_search rows before the filter, and on 64-bit hashes with many ties even an iterative scan
# can stop early because the crowd's graph never links out to the copy (README "Safe decoding and
# dedup" has the measurements). So a tenant of up to EXACT_SCAN_MAX_IMAGES images is searched
# exactly: its own rows (the (tenant_id, sha256) index or a sequential scan), every distance
# computed (four comparisons per hash kind), which is complete by construction and costs about
# 0.3-0.5 us per image and comparison.
# A bigger tenant goes through the index with a strict-order iterative scan, bounded by
# HNSW_MAX_SCAN_TUPLES: approximate, never silently limited to ef_search rows.
EXACT_SCAN_MAX_IMAGES = 250_000
HNSW_MAX_SCAN_TUPLES = 100_000

_TENANT_SIZE = text("SELECT count(*) FROM (SELECT 1 FROM images WHERE tenant_id = :t LIMIT :cap) s")

# Per hash kind, the nearest of four comparisons (models.hashing.candidate_distances): the query's
# plain hash against the stored plain one, its trimmed hash and its mirrored trimmed hash against
# the stored trimmed one, its centre hash against the stored centre one (the plain one where a row
# stored before migration 0009 has no trimmed or centre hashes).
_KIND_DIST = ("least(bit_count({k} # CAST(:{q} AS bit(64))),"
              " bit_count(coalesce({k}_trimmed, {k}) # CAST(:{q}t AS bit(64))),"
              " bit_count(coalesce({k}_trimmed, {k}) # CAST(:{q}m AS bit(64))),"
              " bit_count(coalesce({k}_centre, {k}) # CAST(:{q}c AS bit(64))))")
_DP, _DD = _KIND_DIST.format(k="phash", q="p"), _KIND_DIST.format(k="dhash", q="d")
_ROWS = ("SELECT id, storage_uri, sha256, phash, dhash, phash_trimmed, dhash_trimmed, phash_centre,"
         " dhash_centre FROM images"
         " WHERE tenant_id = :t AND id <> ALL(CAST(:ex AS bigint[]))")

# bit_count(a # b) is the Hamming distance but not the <~> operator, so no HNSW index can serve it.
_SCORED = (f"SELECT id, storage_uri, sha256, {_DP} AS dp, {_DD} AS dd FROM images"
           " WHERE tenant_id = :t AND id <> ALL(CAST(:ex AS bigint[]))")
_NEAR_EXACT = text(f"({_SCORED} ORDER BY dp, id LIMIT :k) UNION ({_SCORED} ORDER BY dd, id LIMIT :k)")

# One index scan per comparison (eight HNSW walks); the k nearest per kind are picked afterwards.
_INDEX_SCANS = [("phash", "p"), ("phash_trimmed", "pt"), ("phash_trimmed", "pm"), ("phash_centre", "pc"),
                ("dhash", "d"), ("dhash_trimmed", "dt"), ("dhash_trimmed", "dm"), ("dhash_centre", "dc")]
_NEAR_INDEX = text(
    f"SELECT id, storage_uri, sha256, {_DP} AS dp, {_DD} AS dd FROM ("
    + " UNION ".join(f"({_ROWS} ORDER BY {col} <~> CAST(:{q} AS bit(64)) LIMIT :k)"
                     for col, q in _INDEX_SCANS)
    + ") c")

_ITERATIVE_SCAN = text("SELECT set_config('hnsw.iterative_scan', 'strict_order', true), "
                       "set_config('hnsw.max_scan_tuples', :tuples, true)")


def near_candidates(session: Session, tenant_id: str, image_id: int, *, phash: str, dhash: str, k: int,
                    max_hamming: int, exclude: tuple[int, ...] = (), trimmed: tuple[str, str] | None = None,
                    mirrored: tuple[str, str] | None = None, centre: tuple[str, str] | None = None,
                    exact_up_to: int = EXACT_SCAN_MAX_IMAGES) -> list[NearCandidate]:
    """The tenant's images closest to the query (the ``k`` nearest by pHash distance and the ``k``
    nearest by dHash distance), within ``max_hamming`` on either, nearest first; never
    ``image_id`` or an id in ``exclude``. ``trimmed``, ``mirrored`` and ``centre`` are the query's
    (pHash, dHash) of its trimmed form, of that mirrored and of its centre
    (``models.hashing.CandidateHashes``; default: the plain ones); each distance is the nearest of
    the four comparisons.

    Exact over the tenant's rows while it has at most ``exact_up_to`` images, whatever other
    tenants hold; above that HNSW iterative scans (approximate)."""
    pt, dt = trimmed or (phash, dhash)
    pm, dm = mirrored or (pt, dt)
    pc, dc = centre or (phash, dhash)
    params = {"p": phash, "d": dhash, "pt": pt, "dt": dt, "pm": pm, "dm": dm, "pc": pc, "dc": dc,
              "t": tenant_id,
              "ex": [image_id, *exclude], "k": k}
    size = session.execute(_TENANT_SIZE, {"t": tenant_id, "cap": exact_up_to + 1}).scalar_one()
    if size <= exact_up_to:
        rows = session.execute(_NEAR_EXACT, params).all()
    else:
        # SET LOCAL inside a savepoint that is rolled back: the settings end with the search, as
        # a function's SET clause ends with the call (the catalog search functions use those).
        savepoint = session.begin_nested()
        try:
            session.execute(_ITERATIVE_SCAN, {"tuples": str(HNSW_MAX_SCAN_TUPLES)})
            rows = session.execute(_NEAR_INDEX, params).all()
        finally:
            savepoint.rollback()
    nearest = {r.id: r for kind in ("dp", "dd")
               for r in sorted(rows, key=lambda r: (getattr(r, kind), r.id))[:k]}
    found = sorted(((min(r.dp, r.dd), r.id, r) for r in nearest.values()), key=lambda x: (x[0], x[1]))
    return [NearCandidate(r.id, r.storage_uri, dist, r.sha256) for dist, _, r in found if dist <= max_hamming]


def _group_of(session: Session, tenant_id: str, representative_id: int, method: str) -> int:
    """The group ``representative_id`` is a member of, or a new one it represents (a member itself,
    with ``method`` and distance 0)."""
    group_id = session.scalar(select(DuplicateMember.group_id)
                              .where(DuplicateMember.image_id == representative_id))
    if group_id is not None:
        return group_id
    group_id = session.execute(
        insert(DuplicateGroup).values(tenant_id=tenant_id, representative_image_id=representative_id)
        .on_conflict_do_nothing(index_elements=["representative_image_id"]).returning(DuplicateGroup.id)
    ).scalar_one_or_none() or session.scalar(
        select(DuplicateGroup.id).where(DuplicateGroup.representative_image_id == representative_id))
    assert group_id is not None
    session.execute(insert(DuplicateMember).values(group_id=group_id, image_id=representative_id,
                                                   tenant_id=tenant_id, method=method, hamming_distance=0,
                                                   inliers=None).on_conflict_do_nothing())
    return group_id


def record_near_duplicate(session: Session, tenant_id: str, image_id: int, match_id: int,
                          hamming: int, inliers: int) -> None:
    """Put ``image_id`` in ``match_id``'s duplicate group (created with the match as representative)."""
    group_id = _group_of(session, tenant_id, match_id, "near")
    session.execute(insert(DuplicateMember).values(group_id=group_id, image_id=image_id, tenant_id=tenant_id,
                                                   method="near", hamming_distance=hamming, inliers=inliers)
                    .on_conflict_do_nothing())


def record_exact_duplicate(session: Session, tenant_id: str, image_id: int) -> None:
    """Record that several products use the same bytes (one content-addressed image row): the image
    is a member with method ``exact`` of the group it represents, and ``catalog.duplicate_groups``
    lists those products under it. Idempotent, and the same whichever of an exact and a near copy
    came first: a near group the image already represents gets its own row marked ``exact``; an image
    that is a near member of another image's group stays that (its near evidence is kept, and the
    view lists every product using it there)."""
    _group_of(session, tenant_id, image_id, "exact")
    session.execute(
        update(DuplicateMember)
        .where(DuplicateMember.image_id == image_id, DuplicateMember.tenant_id == tenant_id,
               DuplicateMember.method == "near",
               DuplicateMember.group_id == select(DuplicateGroup.id)
               .where(DuplicateGroup.representative_image_id == image_id).scalar_subquery())
        .values(method="exact"))


def linked_elsewhere(session: Session, tenant_id: str, image_id: int, *, product_id: int,
                     product_version: int) -> bool:
    """Whether anything but this product version uses the image (another product or an older
    version): False means this version brought it in, also when a redelivery finds it stored."""
    return session.scalar(select(
        select(ProductImage.image_id)
        .where(ProductImage.image_id == image_id, ProductImage.tenant_id == tenant_id,
               or_(ProductImage.product_id != product_id, ProductImage.product_version != product_version))
        .exists())) or False


def product_using(session: Session, tenant_id: str, image_id: int, *, exclude_product: int) -> str | None:
    """The external id of the first other product of the tenant that used this image, if any."""
    return session.scalar(
        select(Product.external_id).join(ProductImage, ProductImage.product_id == Product.id)
        .where(ProductImage.image_id == image_id, ProductImage.tenant_id == tenant_id,
               Product.id != exclude_product).order_by(Product.id).limit(1))


# ------------------------------------------------------------------ editing groups (merchant decisions)

_GROUPS_LOCK_CLASS = 0x6475  # two-key advisory locks: (this class, hashtext(tenant)); its own key space


def lock_groups(session: Session, tenant_id: str) -> None:
    """Serialise edits of the tenant's duplicate groups for the rest of this transaction (fetch's
    recording and decision handling), so a decision and a concurrent dedup pass cannot each miss
    the other's rows."""
    session.execute(text("SELECT pg_advisory_xact_lock(:c, hashtext(:t))"),
                    {"c": _GROUPS_LOCK_CLASS, "t": tenant_id})


@dataclass(frozen=True)
class GroupMember:
    image_id: int
    sha256: str
    method: str
    representative: bool


def stored_rows(session: Session, tenant_id: str, digests: list[str]) -> dict[str, NewImage]:
    """The tenant's stored rows of these digests, as the fetch stage would have described them (one
    query; digests not stored are absent)."""
    if not digests:
        return {}
    rows = session.execute(select(Image).where(Image.tenant_id == tenant_id, Image.sha256.in_(digests))).scalars()
    return {r.sha256: NewImage(sha256=r.sha256, phash=r.phash, dhash=r.dhash, width=r.width, height=r.height,
                               byte_size=r.byte_size, format=r.format, storage_uri=r.storage_uri,
                               phash_trimmed=r.phash_trimmed, dhash_trimmed=r.dhash_trimmed,
                               phash_centre=r.phash_centre, dhash_centre=r.dhash_centre) for r in rows}


def ids_by_sha256(session: Session, tenant_id: str, digests: list[str]) -> dict[str, int]:
    rows = session.execute(select(Image.sha256, Image.id)
                           .where(Image.tenant_id == tenant_id, Image.sha256.in_(digests))).all()
    return {r.sha256: r.id for r in rows}


def sha256_of(session: Session, tenant_id: str, image_id: int) -> str | None:
    return session.scalar(select(Image.sha256).where(Image.tenant_id == tenant_id, Image.id == image_id))


def group_id_of(session: Session, tenant_id: str, image_id: int) -> int | None:
    return session.scalar(select(DuplicateMember.group_id)
                          .where(DuplicateMember.tenant_id == tenant_id,
                                 DuplicateMember.image_id == image_id))


def group_members(session: Session, tenant_id: str, group_id: int) -> list[GroupMember]:
    """The group's members in the order they joined (the representative first)."""
    rows = session.execute(
        select(DuplicateMember.image_id, Image.sha256, DuplicateMember.method,
               (DuplicateGroup.representative_image_id == DuplicateMember.image_id).label("rep"))
        .join(Image, Image.id == DuplicateMember.image_id)
        .join(DuplicateGroup, DuplicateGroup.id == DuplicateMember.group_id)
        .where(DuplicateMember.tenant_id == tenant_id, DuplicateMember.group_id == group_id)
        .order_by(DuplicateGroup.representative_image_id != DuplicateMember.image_id,
                  DuplicateMember.created_at, DuplicateMember.image_id)).all()
    return [GroupMember(r.image_id, r.sha256, r.method, bool(r.rep)) for r in rows]


def add_member(session: Session, tenant_id: str, group_id: int, image_id: int, *, method: str,
               hamming: int | None = None, inliers: int | None = None) -> None:
    session.execute(insert(DuplicateMember).values(group_id=group_id, image_id=image_id, tenant_id=tenant_id,
                                                   method=method, hamming_distance=hamming, inliers=inliers)
                    .on_conflict_do_nothing())


def new_group(session: Session, tenant_id: str, representative_id: int, method: str) -> int:
    """The group ``representative_id`` is in, or a new one it represents (a member with ``method``)."""
    return _group_of(session, tenant_id, representative_id, method)


def set_method(session: Session, tenant_id: str, image_id: int, method: str) -> None:
    session.execute(update(DuplicateMember)
                    .where(DuplicateMember.tenant_id == tenant_id, DuplicateMember.image_id == image_id)
                    .values(method=method))


def move_members(session: Session, tenant_id: str, image_ids: list[int], group_id: int) -> None:
    session.execute(update(DuplicateMember)
                    .where(DuplicateMember.tenant_id == tenant_id, DuplicateMember.image_id.in_(image_ids))
                    .values(group_id=group_id))


def evict(session: Session, tenant_id: str, image_ids: list[int]) -> None:
    """Delete these images' member rows and nothing else (the caller tidies the groups)."""
    session.execute(delete(DuplicateMember).where(DuplicateMember.tenant_id == tenant_id,
                                                  DuplicateMember.image_id.in_(image_ids)))


def delete_group(session: Session, tenant_id: str, group_id: int) -> None:
    session.execute(delete(DuplicateGroup).where(DuplicateGroup.tenant_id == tenant_id,
                                                 DuplicateGroup.id == group_id))


def remove_member(session: Session, tenant_id: str, image_id: int) -> None:
    """Take the image out of its group; a representative hands the group to the member that joined
    next. A group left with its representative alone is dropped, unless that member records an
    exact duplicate (one image used by several products)."""
    group_id = group_id_of(session, tenant_id, image_id)
    if group_id is None:
        return
    evict(session, tenant_id, [image_id])
    rest = group_members(session, tenant_id, group_id)
    if rest and not any(m.representative for m in rest):
        session.execute(update(DuplicateGroup).where(DuplicateGroup.tenant_id == tenant_id,
                                                     DuplicateGroup.id == group_id)
                        .values(representative_image_id=rest[0].image_id))
    drop_if_trivial(session, tenant_id, group_id)


def drop_if_trivial(session: Session, tenant_id: str, group_id: int) -> None:
    """Delete the group when nothing is left in it but, at most, a representative that is not an
    exact duplicate (members cascade)."""
    left = session.execute(select(func.count(), func.bool_or(DuplicateMember.method == "exact"))
                           .where(DuplicateMember.tenant_id == tenant_id,
                                  DuplicateMember.group_id == group_id)).one()
    if left[0] == 0 or (left[0] == 1 and not left[1]):
        delete_group(session, tenant_id, group_id)


# ------------------------------------------------------------------ hash backfill (rows stored before 0009)

_HASHLESS = or_(Image.phash_trimmed.is_(None), Image.dhash_trimmed.is_(None),
                Image.phash_centre.is_(None), Image.dhash_centre.is_(None))


@dataclass(frozen=True)
class HashlessImage:
    """An image row that lacks some of the trimmed/centre hashes candidate search compares."""

    image_id: int
    tenant_id: str
    sha256: str
    storage_uri: str


def count_hashless(session: Session, *, after_id: int = 0) -> int:
    """Rows above ``after_id`` still lacking a trimmed or centre hash (every tenant the role sees)."""
    return session.scalar(select(func.count()).select_from(Image).where(_HASHLESS, Image.id > after_id)) or 0


def hashless_batch(session: Session, *, after_id: int, limit: int) -> list[HashlessImage]:
    """The next ``limit`` such rows by id above ``after_id`` (keyset paging: a run resumes anywhere)."""
    rows = session.execute(select(Image.id, Image.tenant_id, Image.sha256, Image.storage_uri)
                           .where(_HASHLESS, Image.id > after_id).order_by(Image.id).limit(limit)).all()
    return [HashlessImage(r.id, r.tenant_id, r.sha256, r.storage_uri) for r in rows]


def fill_hashes(session: Session, tenant_id: str, image_id: int, *, trimmed: tuple[str, str],
                centre: tuple[str, str]) -> bool:
    """Set the missing trimmed and centre hashes of one row, keeping any already there (a
    concurrent writer's or an earlier run's); False when the row is gone or was already complete."""
    def keep(column, value: str):  # noqa: ANN001, ANN202
        return func.coalesce(column, cast(value, BIT(64)))

    done = session.execute(
        update(Image).where(Image.id == image_id, Image.tenant_id == tenant_id, _HASHLESS)
        .values(phash_trimmed=keep(Image.phash_trimmed, trimmed[0]),
                dhash_trimmed=keep(Image.dhash_trimmed, trimmed[1]),
                phash_centre=keep(Image.phash_centre, centre[0]), dhash_centre=keep(Image.dhash_centre, centre[1]))
        .returning(Image.id))
    return done.scalar_one_or_none() is not None
