"""Blue/green embedding model versions: register, backfill bookkeeping, compare, activate, drop.

The *target set* of a backfill is what searches can currently return: the listings embedded by
the active clip version (every listing when none is active yet, or when the active one has no
rows). A new version is written beside the active one (status ``backfilling``, invisible to the
``catalog`` functions), compared, and switched in one transaction. HNSW indexes are partial per
dimension, so a version of a new size gets its own pair of indexes
(``db.vector_indexes.ensure_dimension_index``, DDL the table owner runs).

Every step reads and writes all tenants: callers run them in the system scope as the maintenance
role (``db.engine.admin_session`` on ``workers.database.get_admin_session_factory()``);
``run_backfill`` opens its own transactions that way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from db.engine import admin_session, sees_every_tenant
from db.enums import ModelKind, ModelStatus
from db.vector_indexes import DimensionError, has_dimension_index
from db.vector_indexes import check_dims as _vector_check_dims

class VersionError(Exception):
    """A lifecycle step refused (unknown version, active version dropped, coverage too low…)."""


@dataclass(frozen=True)
class VersionSpec:
    name: str
    revision: str
    dims: int
    profile: str
    random_weights: bool
    params: dict[str, Any] = field(default_factory=dict)
    weights_uri: str | None = None  # what GPU workers load once this version is active


@dataclass(frozen=True)
class VersionRow:
    id: int
    name: str
    revision: str
    dims: int | None
    status: str
    rows: int
    metrics: dict[str, Any]


@dataclass(frozen=True)
class BackfillPhoto:
    """One photo the pipeline embedded for a listing, as it recorded it (``photo_embeddings``):
    where it sits, the box it was cut to (None: the whole photo) and whether it shows the product.
    The backfill carries ``on_product`` over rather than asking the new model again, so the new
    product vector averages the same photos as the one it replaces."""

    image_id: int
    position: int
    storage_uri: str
    box: list[float] | None
    on_product: bool
    product_probability: float | None
    grounding_id: int | None


@dataclass(frozen=True)
class BackfillItem:
    """What an embedder needs to embed one listing: its image (and crop box) and its text, and every
    photo the pipeline embedded for it (``photos``, in position order; empty for a listing stored
    without photo rows, whose product vector is its primary photo's)."""

    listing_id: int
    tenant_id: str
    product_id: int
    category: str
    image_id: int
    storage_uri: str
    # The detector box the pipeline cropped to (before its padding); None where it embedded the
    # whole photo (a fallback grounding: no box scored above the threshold, or no grounding).
    box: list[float] | None
    text_input: str
    photos: tuple[BackfillPhoto, ...] = ()


@dataclass(frozen=True)
class Coverage:
    """How much of what searches return a version has embedded."""

    target: int  # listings searches can return now (the target set)
    embedded: int  # of those, the ones the version has an embedding for
    listings: int  # every listing of the catalog

    @property
    def ratio(self) -> float:
        """``embedded / target``; with no target, 1.0 on an empty catalog (nothing to cover) and
        0.0 when listings exist (nothing of them is covered)."""
        if self.target:
            return self.embedded / self.target
        return 0.0 if self.listings else 1.0

    @property
    def covers_nothing(self) -> bool:
        """Listings exist and the version embeds none that searches return: activating it would
        leave every similarity search empty."""
        return self.listings > 0 and self.embedded == 0


@dataclass(frozen=True)
class BackfillReport:
    written: int
    seconds: float
    coverage: Coverage


@dataclass(frozen=True)
class Comparison:
    version_id: int
    coverage: Coverage
    recall_at_k: float | None
    k: int
    queries: int
    ef_search: int


EmbedBatch = Callable[[Sequence[BackfillItem]], tuple[np.ndarray, ...]]
"""Returns (product image vectors, text vectors), one row per item, in item order, and optionally
a third element: per item, one row per ``item.photos`` entry (that photo's own vector), which the
backfill stores as the version's ``photo_embeddings``."""


# ---------------------------------------------------------------- registry

def register_version(session: Session, spec: VersionSpec) -> int:
    """Idempotent: the id of the clip version (kind, name, revision), created as a candidate."""
    _check_dims(spec.dims)
    row = session.execute(
        text(
            "INSERT INTO model_versions (kind, name, revision, profile, random_weights, dims, params, weights_uri) "
            "VALUES (:kind, :name, :revision, :profile, :random_weights, :dims, CAST(:params AS jsonb), :uri) "
            "ON CONFLICT (kind, name, revision) DO UPDATE SET "
            "weights_uri = coalesce(model_versions.weights_uri, EXCLUDED.weights_uri) "
            "RETURNING id, dims"
        ),
        {"kind": ModelKind.clip.value, "name": spec.name, "revision": spec.revision,
         "profile": spec.profile, "random_weights": spec.random_weights, "dims": spec.dims,
         "params": _json(spec.params), "uri": spec.weights_uri},
    ).one()
    if row.dims != spec.dims:
        raise VersionError(f"clip version {spec.name}@{spec.revision} is registered with {row.dims} dims, "
                           f"not {spec.dims}")
    return int(row.id)


def get_version(session: Session, version_id: int, *, lock: bool = False) -> VersionRow:
    row = session.execute(
        text("SELECT mv.id, mv.name, mv.revision, mv.dims, mv.status, mv.metrics, "
             "(SELECT count(*) FROM embeddings e WHERE e.model_version_id = mv.id) AS rows "
             "FROM model_versions mv WHERE mv.id = :id AND mv.kind = 'clip'"
             + (" FOR UPDATE" if lock else "")),
        {"id": version_id},
    ).first()
    if row is None:
        raise VersionError(f"no clip model version with id {version_id}")
    return VersionRow(row.id, row.name, row.revision, row.dims, row.status, int(row.rows), row.metrics)


def list_versions(session: Session) -> list[VersionRow]:
    rows = session.execute(
        text("SELECT mv.id, mv.name, mv.revision, mv.dims, mv.status, mv.metrics, coalesce(c.n, 0) AS rows "
             "FROM model_versions mv LEFT JOIN (SELECT model_version_id, count(*) AS n FROM embeddings "
             "GROUP BY model_version_id) c ON c.model_version_id = mv.id "
             "WHERE mv.kind = 'clip' ORDER BY mv.id")
    )
    return [VersionRow(r.id, r.name, r.revision, r.dims, r.status, int(r.rows), r.metrics) for r in rows]


def active_version_id(session: Session) -> int | None:
    return session.execute(
        text("SELECT id FROM model_versions WHERE kind = 'clip' AND status = 'active'")
    ).scalar_one_or_none()


# ---------------------------------------------------------------- backfill

# Listings searches can return now: those embedded by the active version, or all when none is
# active or the active one has no rows (it returns nothing, so a backfill must cover everything
# rather than nothing, or no version could ever replace it).
_TARGETS = """
    WITH active AS (SELECT id FROM model_versions WHERE kind = 'clip' AND status = 'active')
    SELECT l.id AS listing_id FROM listings l
    WHERE NOT EXISTS (SELECT 1 FROM embeddings ae JOIN active a ON ae.model_version_id = a.id)
       OR EXISTS (SELECT 1 FROM embeddings ae, active a
                  WHERE ae.listing_id = l.id AND ae.model_version_id = a.id)
"""


def coverage(session: Session, version_id: int) -> Coverage:
    row = session.execute(
        text(f"WITH targets AS ({_TARGETS}) SELECT count(*) AS target, "
             "count(*) FILTER (WHERE EXISTS (SELECT 1 FROM embeddings e WHERE e.listing_id = t.listing_id "
             "AND e.model_version_id = :v)) AS embedded, (SELECT count(*) FROM listings) AS listings "
             "FROM targets t"),
        {"v": version_id},
    ).one()
    return Coverage(int(row.target), int(row.embedded), int(row.listings))


def pending_items(session: Session, version_id: int, *, after_listing_id: int = 0,
                  limit: int = 256) -> list[BackfillItem]:
    """Target listings that lack ``version_id``, in listing-id order after a cursor, each with the
    text and the photos the pipeline embedded for it, both read from one version: the active clip
    version where it embedded the listing, else the newest that did (``recorded_photos``)."""
    rows = session.execute(
        text(f"""
            WITH targets AS ({_TARGETS})
            SELECT l.id, l.tenant_id, l.product_id, l.category, l.image_id, i.storage_uri,
                   CASE WHEN g.fallback THEN NULL ELSE g.box END AS box,
                   coalesce(src.text_input, l.content ->> 'title', '') AS text_input, src.version_id
            FROM targets t
            JOIN listings l ON l.id = t.listing_id
            -- What the pipeline recorded, from one version: the active one where it embedded the
            -- listing, else the newest that did (text here, photos in recorded_photos).
            LEFT JOIN LATERAL (SELECT ae.text_input, ae.model_version_id AS version_id FROM embeddings ae
                               JOIN model_versions mv ON mv.id = ae.model_version_id
                               WHERE ae.listing_id = l.id
                               ORDER BY (mv.status = 'active') DESC, ae.model_version_id DESC LIMIT 1) src ON true
            JOIN images i ON i.id = l.image_id
            LEFT JOIN groundings g ON g.id = l.grounding_id
            WHERE l.id > :after
              AND NOT EXISTS (SELECT 1 FROM embeddings e WHERE e.listing_id = l.id AND e.model_version_id = :v)
            ORDER BY l.id
            LIMIT :limit
        """),
        {"v": version_id, "after": after_listing_id, "limit": limit},
    )
    rows = rows.all()
    items = [BackfillItem(*r[:-1]) for r in rows]
    photos = recorded_photos(session, {r.id: r.version_id for r in rows if r.version_id is not None})
    return [replace(it, photos=photos.get(it.listing_id, ())) for it in items]


def recorded_photos(session: Session, sources: dict[int, int]) -> dict[int, tuple[BackfillPhoto, ...]]:
    """Each listing's photos as the pipeline recorded them under its source clip version
    (``{listing id: version id}``, as ``pending_items`` picks it), one query for a batch."""
    if not sources:
        return {}
    rows = session.execute(
        text("""
            SELECT pe.listing_id, pe.image_id, pe.position, i.storage_uri,
                   CASE WHEN g.fallback THEN NULL ELSE g.box END AS box,
                   pe.on_product, pe.product_probability, pe.grounding_id
            FROM unnest(CAST(:listings AS bigint[]), CAST(:versions AS bigint[])) AS s(listing_id, version_id)
            JOIN photo_embeddings pe ON pe.listing_id = s.listing_id AND pe.model_version_id = s.version_id
            JOIN images i ON i.id = pe.image_id
            LEFT JOIN groundings g ON g.id = pe.grounding_id
            ORDER BY pe.listing_id, pe.position
        """),
        {"listings": list(sources), "versions": list(sources.values())},
    )
    out: dict[int, list[BackfillPhoto]] = {}
    for r in rows:
        out.setdefault(r.listing_id, []).append(BackfillPhoto(r.image_id, r.position, r.storage_uri, r.box,
                                                              r.on_product, r.product_probability, r.grounding_id))
    return {lid: tuple(ps) for lid, ps in out.items()}


def write_embeddings(session: Session, version_id: int, dims: int, items: Sequence[BackfillItem],
                     image_vectors: np.ndarray, text_vectors: np.ndarray,
                     photo_vectors: Sequence[np.ndarray] | None = None) -> int:
    """Idempotent insert of one batch (ON CONFLICT on (listing, version) does nothing), and of each
    item's photo vectors under the version where given (ON CONFLICT on (listing, image, version))."""
    image_vectors, text_vectors = np.asarray(image_vectors), np.asarray(text_vectors)
    expected = (len(items), dims)
    if image_vectors.shape != expected or text_vectors.shape != expected:
        raise VersionError(f"embedder returned {image_vectors.shape}/{text_vectors.shape}, expected {expected}")
    if not items:
        return 0
    if photo_vectors is not None:
        _write_photo_embeddings(session, version_id, dims, items, photo_vectors)
    result = session.execute(
        text("INSERT INTO embeddings (tenant_id, product_id, listing_id, model_version_id, category, dims, "
             "image_embedding, text_embedding, text_input) VALUES (:tenant_id, :product_id, :listing_id, :v, "
             ":category, :dims, CAST(:image AS vector), CAST(:text AS vector), :text_input) "
             "ON CONFLICT (listing_id, model_version_id) DO NOTHING"),
        [{"tenant_id": it.tenant_id, "product_id": it.product_id, "listing_id": it.listing_id, "v": version_id,
          "category": it.category, "dims": dims, "image": image_vectors[n].astype(np.float32),
          "text": text_vectors[n].astype(np.float32), "text_input": it.text_input}
         for n, it in enumerate(items)],
    )
    session.flush()
    return int(result.rowcount or 0)


def _write_photo_embeddings(session: Session, version_id: int, dims: int, items: Sequence[BackfillItem],
                            photo_vectors: Sequence[np.ndarray]) -> None:
    if len(photo_vectors) != len(items):
        raise VersionError(f"embedder returned photo vectors for {len(photo_vectors)} of {len(items)} listings")
    rows = []
    for it, vectors in zip(items, photo_vectors):
        vectors = np.asarray(vectors)
        if vectors.shape != (len(it.photos), dims):
            raise VersionError(f"embedder returned {vectors.shape} photo vectors for listing {it.listing_id}, "
                               f"expected {(len(it.photos), dims)}")
        rows.extend({"tenant_id": it.tenant_id, "product_id": it.product_id, "listing_id": it.listing_id,
                     "image_id": p.image_id, "v": version_id, "position": p.position, "on_product": p.on_product,
                     "probability": p.product_probability, "grounding_id": p.grounding_id, "dims": dims,
                     "embedding": vectors[n].astype(np.float32)} for n, p in enumerate(it.photos))
    if rows:
        session.execute(
            text("INSERT INTO photo_embeddings (tenant_id, product_id, listing_id, image_id, model_version_id, "
                 "position, on_product, product_probability, grounding_id, dims, embedding) VALUES (:tenant_id, "
                 ":product_id, :listing_id, :image_id, :v, :position, :on_product, :probability, :grounding_id, "
                 ":dims, CAST(:embedding AS vector)) ON CONFLICT (listing_id, image_id, model_version_id) DO NOTHING"),
            rows)


def _mark_backfilling(session: Session, version_id: int) -> VersionRow:
    version = get_version(session, version_id, lock=True)
    if version.status == ModelStatus.retired and version.rows == 0:
        raise VersionError(f"clip version {version_id} was dropped; register a new revision instead")
    if version.dims is None:
        raise VersionError(f"clip version {version_id} has no dims")
    if version.status == ModelStatus.candidate:
        session.execute(text("UPDATE model_versions SET status = 'backfilling' WHERE id = :id"),
                        {"id": version_id})
    return version


def run_backfill(factory: sessionmaker[Session], version_id: int, embed: EmbedBatch, *,
                 batch_size: int = 64, max_rows_per_s: float | None = None, limit: int | None = None,
                 on_progress: Callable[[int, Coverage], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> BackfillReport:
    """Embed every target listing that lacks ``version_id``; one committed transaction per batch.

    Every transaction is a maintenance one (``admin_session``: the system scope, so ``factory``
    must run as the maintenance role). Resumable by construction (done listings are skipped),
    paced to ``max_rows_per_s``, and stopping after ``limit`` rows when given.
    ``on_progress(written_so_far, coverage_at_start)``.
    """
    with admin_session(factory) as s:
        dims = int(_mark_backfilling(s, version_id).dims or 0)
        start = coverage(s, version_id)
    started, written, cursor = clock(), 0, 0
    while limit is None or written < limit:
        size = batch_size if limit is None else min(batch_size, limit - written)
        with admin_session(factory) as s:
            items = pending_items(s, version_id, after_listing_id=cursor, limit=size)
            if not items:
                break
            image_vectors, text_vectors, *photo_vectors = embed(items)
            write_embeddings(s, version_id, dims, items, image_vectors, text_vectors,
                             photo_vectors[0] if photo_vectors else None)
        written += len(items)
        cursor = items[-1].listing_id
        if on_progress is not None:
            on_progress(written, start)
        if max_rows_per_s:
            ahead = written / max_rows_per_s - (clock() - started)
            if ahead > 0:
                sleep(ahead)
    with admin_session(factory) as s:
        final = coverage(s, version_id)
    return BackfillReport(written, clock() - started, final)


# ---------------------------------------------------------------- compare / activate / drop

def compare(session: Session, version_id: int, *, k: int = 10, queries: int = 100, ef_search: int = 40,
            seed: float = 0.42) -> Comparison:
    """Coverage and recall@k of the version's HNSW neighbours against exact search, stored in metrics."""
    version = get_version(session, version_id)
    dims = _check_dims(int(version.dims or 0))
    cov = coverage(session, version_id)
    session.execute(text("SELECT set_config('hnsw.ef_search', :ef, true), "
                         "set_config('hnsw.iterative_scan', 'relaxed_order', true), setseed(:seed)"),
                    {"ef": str(int(ef_search)), "seed": seed})
    sample = session.execute(
        text("SELECT id, tenant_id, image_embedding FROM embeddings WHERE model_version_id = :v "
             "ORDER BY random() LIMIT :n"),
        {"v": version_id, "n": queries},
    ).all()
    # The HNSW index matches only the cast expression; the bare column forces an exact scan.
    approx_sql = text(
        f"SELECT id FROM embeddings WHERE dims = {dims} AND model_version_id = :v AND tenant_id = :t "
        f"ORDER BY image_embedding::vector({dims}) <=> CAST(:q AS vector({dims})) LIMIT :k")
    exact_sql = text(
        "SELECT id FROM embeddings WHERE model_version_id = :v AND tenant_id = :t "
        "ORDER BY image_embedding <=> CAST(:q AS vector) LIMIT :k")
    hits = total = 0
    for row in sample:
        params = {"v": version_id, "t": row.tenant_id, "q": row.image_embedding, "k": k}
        approx = set(session.execute(approx_sql, params).scalars())
        exact = set(session.execute(exact_sql, params).scalars())
        hits += len(approx & exact)
        total += len(exact)
    recall = hits / total if total else None
    result = Comparison(version_id, cov, recall, k, len(sample), ef_search)
    session.execute(
        text("UPDATE model_versions SET metrics = metrics || CAST(:m AS jsonb) WHERE id = :id"),
        {"id": version_id, "m": _json({"compare": {"coverage": cov.ratio, "target": cov.target,
                                                   "embedded": cov.embedded, "listings": cov.listings,
                                                   f"recall_at_{k}": recall,
                                                   "queries": len(sample), "ef_search": ef_search}})},
    )
    return result


def gate_refusal(params: dict[str, Any] | None, metrics: dict[str, Any] | None) -> str | None:
    """Why a clip version trained here (its params name the dataset it was fine-tuned on) may not
    serve yet: its gate decision is missing or a refusal; None when it may (a gate-approved
    candidate, or a model that was not trained here, e.g. a new pretrained architecture)."""
    if (params or {}).get("dataset") is None:
        return None
    gate = (metrics or {}).get("gate") or {}
    if gate.get("promoted"):
        return None
    return "; ".join(gate.get("reasons") or []) or "no gate decision yet (`enrich retrain promote`)"


def activate(session: Session, version_id: int, *, force: bool = False) -> int | None:
    """Make ``version_id`` the active clip version in the caller's transaction; returns the old id.

    Refuses below 100 % coverage, without its dimension index, or (a version fine-tuned here)
    without a passing gate decision, unless ``force``. Never, not even
    with ``force``, activates a version that covers none of the listings while listings exist
    (every similarity search would return nothing); on an empty catalog any version may become
    active (the very first one), provided the transaction sees every tenant (an empty catalog is
    not told apart from rows row-level security hides otherwise). Readers see the old or the new
    version, never a mix: both status flips commit together.
    """
    old_id = session.execute(
        text("SELECT id FROM model_versions WHERE kind = 'clip' AND status = 'active' FOR UPDATE")
    ).scalar_one_or_none()
    version = get_version(session, version_id, lock=True)
    if old_id == version_id:
        return old_id
    if version.status == ModelStatus.retired and version.rows == 0:
        raise VersionError(f"clip version {version_id} was dropped and has no embeddings")
    cov = coverage(session, version_id)
    if cov.covers_nothing:
        raise VersionError(f"clip version {version_id} covers none of the {cov.target or cov.listings} listings "
                           "searches return, so every similarity search would return nothing; run `enrich backfill` "
                           "for it first (--force does not skip this)")
    if cov.listings == 0 and not sees_every_tenant(session):
        raise VersionError("this transaction sees no listings but is not in the system scope of a role that "
                           "sees every tenant, so an empty catalog cannot be told from hidden rows; run it as "
                           "the maintenance role (db.engine.admin_session, ENRICH_DB__ADMIN_ROLE)")
    if not force:
        params = session.execute(text("SELECT params FROM model_versions WHERE id = :id"),
                                 {"id": version_id}).scalar_one()
        if (why := gate_refusal(params, version.metrics)) is not None:
            raise VersionError(f"clip version {version_id} has not passed the embedder gate: {why}; "
                               "pass --force to activate it anyway")
        if cov.embedded < cov.target:
            raise VersionError(f"clip version {version_id} covers {cov.embedded}/{cov.target} listings "
                               f"({cov.ratio:.1%}); finish the backfill or pass --force")
        if not has_dimension_index(session, int(version.dims or 0)):
            raise VersionError(f"no valid HNSW index for {version.dims} dims; run ensure_dimension_index first "
                               "or pass --force")
    if old_id is not None:
        session.execute(text("UPDATE model_versions SET status = 'retired' WHERE id = :id"), {"id": old_id})
    session.execute(text("UPDATE model_versions SET status = 'active', activated_at = now() WHERE id = :id"),
                    {"id": version_id})
    session.flush()
    return old_id


def category_counts(session: Session, version_id: int) -> dict[str, int]:
    """Embeddings per category of one version (what ``vector_indexes.ensure_category_indexes`` indexes)."""
    rows = session.execute(
        text("SELECT category, count(*) AS n FROM embeddings WHERE model_version_id = :v "
             "GROUP BY category ORDER BY category"),
        {"v": version_id},
    )
    return {r.category: int(r.n) for r in rows}


def dims_still_used(session: Session, dims: int, *, except_version: int) -> bool:
    return bool(session.execute(
        text("SELECT EXISTS (SELECT 1 FROM model_versions mv WHERE mv.kind = 'clip' AND mv.dims = :d "
             "AND mv.id <> :v AND (mv.status <> 'retired' OR EXISTS "
             "(SELECT 1 FROM embeddings e WHERE e.model_version_id = mv.id)))"),
        {"d": dims, "v": except_version},
    ).scalar_one())


def delete_version_rows(session: Session, version_id: int, *, batch_size: int = 10_000) -> int:
    """Delete one batch of the version's embeddings; 0 when none are left. Refuses the active version."""
    version = get_version(session, version_id, lock=True)
    if version.status == ModelStatus.active:
        raise VersionError(f"clip version {version_id} is active; activate another version before dropping it")
    deleted = session.execute(
        text("DELETE FROM embeddings WHERE id IN (SELECT id FROM embeddings WHERE model_version_id = :v "
             "LIMIT :n)"),
        {"v": version_id, "n": batch_size},
    ).rowcount or 0
    session.execute(
        text("UPDATE model_versions SET status = 'retired', "
             "metrics = metrics || jsonb_build_object('dropped_at', now()) WHERE id = :v"),
        {"v": version_id},
    )
    return int(deleted)


def drop_version(session: Session, version_id: int) -> tuple[int, bool]:
    """Delete all rows of a non-active version in this transaction. Returns (deleted, dims index unused)."""
    total = 0
    while (n := delete_version_rows(session, version_id)) > 0:
        total += n
    dims = get_version(session, version_id).dims
    return total, dims is not None and not dims_still_used(session, dims, except_version=version_id)


def _json(value: dict[str, Any]) -> str:
    import json

    return json.dumps(value, default=str)


def _check_dims(dims: int) -> int:
    try:
        return _vector_check_dims(dims)
    except DimensionError as exc:
        raise VersionError(str(exc)) from None
