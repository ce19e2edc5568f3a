"""Tenant isolation in the database: forced row-level security for the non-owner runtime role.

Rows are seeded as the (superuser) test connection inside the rolled-back test transaction, then
the same transaction switches to ``enrich_worker`` / ``enrich_reader`` with ``SET ROLE`` so the
policies of migration 0005 apply exactly as they do to the workers.
"""

from __future__ import annotations

import importlib.util
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import DBAPIError, ProgrammingError
from sqlalchemy.orm import Session

from db import migrate
from db.engine import job_session, set_system_scope, set_tenant, system_session, tenant_session
from db.tables import TENANT_SCOPED_TABLES
from tests.db.catalog_rows import add_embeddings, add_listings, add_model_version, add_products, add_tenant, unit_rows

WORKER, READER = "enrich_worker", "enrich_reader"
DIMS = 512


@contextmanager
def as_role(session: Session, role: str) -> Iterator[None]:
    session.execute(text(f"SET ROLE {role}"))
    try:
        yield
    finally:
        session.execute(text("RESET ROLE"))


@dataclass
class Seeded:
    tenant: str
    product_ids: list[int]
    listing_id: int
    job_id: int


def seed_tenant(session: Session, tenant: str, models: dict[str, int], rng: np.random.Generator) -> Seeded:
    """At least one row of this tenant in every tenant-scoped table."""
    add_tenant(session, tenant)
    exts = ["a", "b", "c"]
    pids = add_products(session, tenant, exts, ["dress"] * 3)
    lids = add_listings(session, tenant, pids, ["dress"] * 3, vlm_id=models["vlm"])
    add_embeddings(session, tenant, pids, lids, ["dress"] * 3, unit_rows(rng, 3, DIMS), clip_id=models["clip"])
    p = {"t": tenant, "pid": pids[0], "lid": lids[0], "mv": models["vlm"]}
    image_id = session.execute(text("SELECT image_id FROM listings WHERE id = :lid"), p).scalar_one()
    p["img"] = image_id
    session.execute(text("INSERT INTO product_images (tenant_id, product_id, product_version, position, image_id,"
                         " source_url) VALUES (:t, :pid, 1, 0, :img, 'https://img.example/a.jpg')"), p)
    p["gid"] = session.execute(text("INSERT INTO duplicate_groups (tenant_id, representative_image_id)"
                                    " VALUES (:t, :img) RETURNING id"), p).scalar_one()
    session.execute(text("INSERT INTO duplicate_members (group_id, image_id, tenant_id, method)"
                         " VALUES (:gid, :img, :t, 'exact')"), p)
    session.execute(text("INSERT INTO groundings (tenant_id, image_id, model_version_id, prompt, fallback)"
                         " VALUES (:t, :img, :mv, 'a dress', true)"), p)
    p["ev"] = uuid.uuid4()
    session.execute(text("INSERT INTO inbox_events (event_id, tenant_id, event_type, status)"
                         " VALUES (:ev, :t, 'product.created', 'accepted')"), p)
    job_id = session.execute(text("INSERT INTO enrichment_jobs (tenant_id, event_id, product_id, product_version,"
                                  " status) VALUES (:t, :ev, :pid, 1, 'done') RETURNING id"), p).scalar_one()
    session.execute(text("INSERT INTO outbox (tenant_id, message_id, routing_key, payload)"
                         " VALUES (:t, :mid, 'listing.enriched', '{}')"), {**p, "mid": uuid.uuid4()})
    session.execute(text("INSERT INTO dead_letters (tenant_id, queue, reason, body)"
                         " VALUES (:t, 'q', 'invalid_event', '\\x00'::bytea)"), p)
    p["fb"] = session.execute(text("INSERT INTO review_feedback (tenant_id, event_id, listing_id, decision, reviewer)"
                                   " VALUES (:t, :rev, :lid, 'edited', 'r') RETURNING id"),
                              {**p, "rev": uuid.uuid4()}).scalar_one()
    session.execute(text("INSERT INTO field_errors (tenant_id, feedback_id, listing_id, category, field,"
                         " model_value, merchant_value, model_versions)"
                         " VALUES (:t, :fb, :lid, 'dress', 'title', '\"a\"', '\"b\"', '{}')"), p)
    p["ds"] = session.execute(text("INSERT INTO training_datasets (name, uri, content_hash, manifest,"
                                   " watermark_feedback_id, window_end) VALUES (:n, 'file:///d', 'h', '{}', 0, now())"
                                   " RETURNING id"), {"n": f"ds-{tenant}"}).scalar_one()
    session.execute(text("INSERT INTO preference_pairs (tenant_id, dataset_id, listing_id, product_id, merchant_id,"
                         " category, source, split, pair_hash, prompt, chosen, rejected) VALUES (:t, :ds, :lid, :pid,"
                         " 'm1', 'dress', 'merchant_correction', 'train', :h, '{}', '{}', '{}')"),
                    {**p, "h": uuid.uuid4().hex})
    session.execute(text("INSERT INTO photo_embeddings (tenant_id, product_id, listing_id, image_id,"
                         " model_version_id, position, on_product, dims, embedding)"
                         " VALUES (:t, :pid, :lid, :img, :cv, 0, true, 2, '[1, 0]')"), {**p, "cv": models["clip"]})
    session.execute(text("INSERT INTO duplicate_decisions (tenant_id, image_a_sha256, image_b_sha256, decision,"
                         " event_id, occurred_at, merchant_id, reviewer) VALUES (:t, repeat('a', 64), repeat('b', 64),"
                         " 'not_duplicate', :ev, now(), 'm1', 'r')"), {**p, "ev": uuid.uuid4()})
    session.flush()
    return Seeded(tenant, pids, lids[0], job_id)


@pytest.fixture
def models(db_session) -> dict[str, int]:  # noqa: ANN001
    return {"vlm": add_model_version(db_session, "vlm", "rls-vlm"),
            "clip": add_model_version(db_session, "clip", "rls-clip", dims=DIMS)}


@pytest.fixture
def two_tenants(db_session, models) -> tuple[Seeded, Seeded]:  # noqa: ANN001
    rng = np.random.default_rng(5)
    suffix = uuid.uuid4().hex[:8]
    a = seed_tenant(db_session, f"rls-a-{suffix}", models, rng)
    b = seed_tenant(db_session, f"rls-b-{suffix}", models, rng)
    return a, b


def _count(session: Session, table: str, tenant: str | None = None) -> int:
    where = " WHERE tenant_id = :t" if tenant else ""
    return session.execute(text(f"SELECT count(*) FROM {table}{where}"), {"t": tenant}).scalar_one()


def test_forced_rls_on_exactly_the_tenant_scoped_tables(db_session) -> None:  # noqa: ANN001
    rows = db_session.execute(text(
        "SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity, pg_get_userbyid(c.relowner) AS owner"
        " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'public' AND c.relkind = 'r'")).all()
    secured = {r.relname for r in rows if r.relrowsecurity and r.relforcerowsecurity}
    assert secured == set(TENANT_SCOPED_TABLES)
    assert WORKER not in {r.owner for r in rows} and READER not in {r.owner for r in rows}
    roles = db_session.execute(text("SELECT rolname, rolcanlogin, rolbypassrls, rolsuper FROM pg_roles"
                                    " WHERE rolname IN (:w, :r)"), {"w": WORKER, "r": READER}).all()
    assert len(roles) == 2 and not any(r.rolcanlogin or r.rolbypassrls or r.rolsuper for r in roles)
    # The migration's frozen table list is the model's list.
    spec = importlib.util.spec_from_file_location(
        "m0005", migrate.MIGRATIONS_DIR / "versions" / "0005_row_level_security.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert set(module.TENANT_SCOPED) | tenant_tables_added_later() == set(TENANT_SCOPED_TABLES)


def tenant_tables_added_later() -> set[str]:
    """Tenant-scoped tables created (and secured) by migrations after 0005/0007 froze their lists:
    each such migration names them in ``TENANT_SCOPED_ADDED``."""
    added: set[str] = set()
    for path in sorted((migrate.MIGRATIONS_DIR / "versions").glob("[0-9]*.py")):
        spec = importlib.util.spec_from_file_location(f"m{path.stem}", path)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        added.update(getattr(module, "TENANT_SCOPED_ADDED", ()))
    return added


def test_no_tenant_sees_nothing(db_session, two_tenants) -> None:  # noqa: ANN001
    for table in TENANT_SCOPED_TABLES:
        assert _count(db_session, table) > 0, f"seed left {table} empty: the check below would prove nothing"
    with as_role(db_session, WORKER):
        for table in TENANT_SCOPED_TABLES:
            assert _count(db_session, table) == 0, table
        # An empty tenant (the value a finished set_config leaves behind) matches nothing either.
        set_tenant(db_session, "")
        assert all(_count(db_session, t) == 0 for t in TENANT_SCOPED_TABLES)
        # The system scope is a setting, not a tenant: any other value of it grants nothing.
        db_session.execute(text("SELECT set_config('enrich.scope', 'System ', true)"))
        assert _count(db_session, "listings") == 0


def test_tenant_sees_only_its_own_rows(db_session, two_tenants) -> None:  # noqa: ANN001
    a, b = two_tenants
    with as_role(db_session, WORKER):
        for own, other in ((a, b), (b, a)):
            set_tenant(db_session, own.tenant)
            for table in TENANT_SCOPED_TABLES:
                assert _count(db_session, table) == _count(db_session, table, own.tenant) > 0, table
                assert _count(db_session, table, other.tenant) == 0, table
            # By primary key too: another tenant's row does not exist for this transaction.
            assert db_session.execute(text("SELECT count(*) FROM listings WHERE id = :id"),
                                      {"id": other.listing_id}).scalar_one() == 0
            # ... and cannot be changed or deleted.
            assert db_session.execute(text("UPDATE listings SET status = 'rejected' WHERE id = :id"),
                                      {"id": other.listing_id}).rowcount == 0
            assert db_session.execute(text("DELETE FROM enrichment_jobs WHERE id = :id"),
                                      {"id": other.job_id}).rowcount == 0
    assert db_session.execute(text("SELECT status FROM listings WHERE id = :id"),
                              {"id": b.listing_id}).scalar_one() == "proposed"


@pytest.mark.parametrize("statement", [
    "INSERT INTO products (tenant_id, merchant_id, external_id, version, category)"
    " VALUES (:other, 'm1', 'smuggled', 1, 'dress')",
    "INSERT INTO outbox (tenant_id, message_id, routing_key, payload)"
    " VALUES (:other, gen_random_uuid(), 'listing.failed', '{}')",
    "INSERT INTO inbox_events (event_id, tenant_id, event_type, status)"
    " VALUES (gen_random_uuid(), NULL, 'product.created', 'rejected')",
    "UPDATE listings SET tenant_id = :other WHERE tenant_id = :own",
])
def test_writing_another_tenants_id_is_refused(db_session, two_tenants, statement: str) -> None:  # noqa: ANN001
    a, b = two_tenants
    with as_role(db_session, WORKER):
        set_tenant(db_session, a.tenant)
        with pytest.raises(DBAPIError, match="row-level security"), db_session.begin_nested():
            db_session.execute(text(statement), {"own": a.tenant, "other": b.tenant})


def test_system_scope_is_for_the_worker_role_only(db_session, two_tenants) -> None:  # noqa: ANN001
    a, b = two_tenants
    with as_role(db_session, WORKER):
        set_system_scope(db_session)
        assert _count(db_session, "outbox", a.tenant) > 0 and _count(db_session, "outbox", b.tenant) > 0
        # Rows without a tenant (invalid events, dead letters of unreadable bodies) live here only.
        db_session.execute(text("INSERT INTO inbox_events (event_id, tenant_id, event_type, status)"
                                " VALUES (gen_random_uuid(), NULL, 'product.created', 'rejected')"))
    with as_role(db_session, READER):
        set_system_scope(db_session)
        assert _count(db_session, "products") == 0
        assert db_session.execute(text("SELECT count(*) FROM catalog.current_listings")).scalar_one() == 0
        with pytest.raises(ProgrammingError, match="permission denied"), db_session.begin_nested():
            db_session.execute(text("SELECT count(*) FROM outbox"))
        with pytest.raises(ProgrammingError, match="permission denied"), db_session.begin_nested():
            db_session.execute(text("UPDATE products SET title = 'x'"))


def test_reader_functions_return_only_the_named_tenant(db_session, two_tenants) -> None:  # noqa: ANN001
    a, b = two_tenants
    with as_role(db_session, READER):
        # No tenant set by the caller: the function scopes itself to its argument.
        rows = db_session.execute(text("SELECT external_id FROM catalog.similar_products(:t, 'a', 10)"),
                                  {"t": a.tenant}).scalars().all()
        assert sorted(rows) == ["b", "c"]
        assert _count(db_session, "embeddings") == 0  # ... while the tables themselves show nothing
        assert db_session.execute(text("SELECT current_setting('enrich.tenant_id', true)")).scalar_one() in (None, "")
        # A caller scoped to tenant A asking about tenant B gets B's rows, and is back to A afterwards.
        set_tenant(db_session, a.tenant)
        rows_b = db_session.execute(text("SELECT external_id FROM catalog.similar_products(:t, 'b', 10)"),
                                    {"t": b.tenant}).scalars().all()
        assert sorted(rows_b) == ["a", "c"]
        assert db_session.execute(text("SELECT current_setting('enrich.tenant_id', true)")).scalar_one() == a.tenant
        assert {r for r in db_session.execute(text("SELECT DISTINCT tenant_id FROM catalog.current_listings"))
                .scalars()} == {a.tenant}
        vec = db_session.execute(text("SELECT CAST(image_embedding AS text) FROM embeddings WHERE tenant_id = :t"
                                      " LIMIT 1"), {"t": a.tenant}).scalar_one()
        hits = db_session.execute(text("SELECT external_id FROM catalog.search_by_embedding(:t, CAST(:q AS vector), 10)"),
                                  {"t": b.tenant, "q": vec}).scalars().all()
        assert sorted(hits) == ["a", "b", "c"]  # B's three products, none of A's
        # Another tenant's product is unknown under that tenant, whatever the caller's own scope.
        with pytest.raises(DBAPIError, match="not found"), db_session.begin_nested():
            db_session.execute(text("SELECT * FROM catalog.similar_products('no-such-tenant', 'a', 10)"))
        # The unscoped body, called directly, runs under the caller's scope: here tenant A only.
        with pytest.raises(DBAPIError, match="not found"), db_session.begin_nested():
            db_session.execute(text("SELECT * FROM catalog_impl.similar_products(:t, 'a', 10, false)"),
                               {"t": b.tenant})


def test_session_helpers_scope_each_transaction(engine) -> None:  # noqa: ANN001
    """tenant_session / system_session / job_session against committed rows, as enrich_worker."""
    from db.engine import make_engine, make_sessionmaker

    suffix = uuid.uuid4().hex[:8]
    ta, tb = f"helper-a-{suffix}", f"helper-b-{suffix}"
    with Session(engine) as s, s.begin():
        for t in (ta, tb):
            add_tenant(s, t)
            add_products(s, t, ["x"], ["dress"])
        pid = s.execute(text("SELECT id FROM products WHERE tenant_id = :t"), {"t": tb}).scalar_one()
        ev = uuid.uuid4()
        s.execute(text("INSERT INTO inbox_events (event_id, tenant_id, event_type, status)"
                       " VALUES (:e, :t, 'product.created', 'accepted')"), {"e": ev, "t": tb})
        job_id = s.execute(text("INSERT INTO enrichment_jobs (tenant_id, event_id, product_id, product_version)"
                                " VALUES (:t, :e, :p, 1) RETURNING id"), {"t": tb, "e": ev, "p": pid}).scalar_one()
    worker = make_engine(engine.url.render_as_string(hide_password=False), pool_size=1, runtime_role=WORKER)
    factory = make_sessionmaker(worker)
    try:
        with factory() as s:
            assert s.execute(text("SELECT current_user")).scalar_one() == WORKER
        with tenant_session(factory, ta) as s:
            assert s.execute(text("SELECT tenant_id FROM products WHERE external_id = 'x' AND tenant_id IN (:a, :b)"),
                             {"a": ta, "b": tb}).scalars().all() == [ta]
        with system_session(factory) as s:
            assert _count(s, "products", ta) == 1 and _count(s, "products", tb) == 1
        with factory() as s, s.begin():  # the scope ended with the previous transaction
            assert _count(s, "products", ta) == 0 and _count(s, "products", tb) == 0
        with job_session(factory, job_id) as s:
            assert s.execute(text("SELECT current_setting('enrich.scope', true)")).scalar_one() == ""
            assert _count(s, "products", tb) == 1 and _count(s, "products", ta) == 0
        with job_session(factory, 2**62) as s:  # unknown job: no tenant at all
            assert _count(s, "products", ta) == 0 and _count(s, "products", tb) == 0
        statements: list[str] = []
        listen = lambda *args: statements.append(args[2])  # noqa: E731 - (conn, cursor, statement, ...)
        event.listen(worker, "before_cursor_execute", listen)
        try:  # the scope and the tenant lookup are one query: the stage's first statement follows it
            with job_session(factory, job_id) as s:
                assert len(statements) == 1
                assert _count(s, "products", tb) == 1
        finally:
            event.remove(worker, "before_cursor_execute", listen)
    finally:
        worker.dispose()
        with Session(engine) as s, s.begin():
            s.execute(text("DELETE FROM enrichment_jobs WHERE id = :j"), {"j": job_id})
            s.execute(text("DELETE FROM inbox_events WHERE event_id = :e"), {"e": ev})
            for t in (ta, tb):
                s.execute(text("DELETE FROM products WHERE tenant_id = :t"), {"t": t})
                s.execute(text("DELETE FROM merchants WHERE tenant_id = :t"), {"t": t})
                s.execute(text("DELETE FROM tenants WHERE id = :t"), {"t": t})


def test_worker_engine_switches_to_the_configured_runtime_role(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENRICH_DB__RUNTIME_ROLE is what the worker processes' engine runs as (workers.database)."""
    from workers import database
    from workers.settings import reset_settings_cache

    monkeypatch.setenv("ENRICH_DB__URL", pg_url)
    monkeypatch.setenv("ENRICH_DB__RUNTIME_ROLE", WORKER)
    reset_settings_cache()
    database.reset_engine()
    try:
        with database.get_engine().connect() as conn:
            assert conn.execute(text("SELECT current_user")).scalar_one() == WORKER
        owner = database.get_owner_engine()  # migrations keep the connecting role
        with owner.connect() as conn:
            assert conn.execute(text("SELECT current_user")).scalar_one() != WORKER
        owner.dispose()
    finally:
        database.reset_engine()
        reset_settings_cache()


@pytest.mark.integration
def test_pipeline_as_enrich_worker_keeps_tenants_apart(secure_deployment, sample_photos, engine) -> None:  # noqa: ANN001
    """Happy path with the workers running as enrich_worker under forced RLS: two tenants, the same
    photo in both (content addressing and exact-duplicate reuse stay per tenant), a stale version
    (outbox relay in the system scope) — everything ends and every message carries its own tenant."""
    from tasks.events import product_event_payload
    from tests.security.conftest import wait_messages

    dep = secure_deployment
    suffix = uuid.uuid4().hex[:8]
    tenants = [f"rlsp-a-{suffix}", f"rlsp-b-{suffix}"]
    (shared, shared_cat), (other, other_cat) = sample_photos[0], sample_photos[3]

    def event(t: str, ext: str, photo: Path, cat: str, version: int = 2, title: str | None = None) -> dict:
        return product_event_payload(tenant_id=t, merchant_id="m1", external_id=ext, version=version, category=cat,
                                     image_urls=[photo.as_uri()], title=title or f"{cat} {ext}",
                                     attributes={"brand": "Acme"})

    first = [dep.publish(event(t, "p1", shared, shared_cat)) for t in tenants]
    first += [dep.publish(event(tenants[0], "p2", other, other_cat))]
    rows = dep.wait_finished(first, timeout=240)
    assert {r.status for r in rows.values()} == {"done"}, [(r.status, r.error_code) for r in rows.values()]
    second = [dep.publish(event(tenants[1], "p3", shared, shared_cat, title=f"{shared_cat} p1")),  # a re-listing in B
              dep.publish(event(tenants[0], "p1", shared, shared_cat, version=1))]  # stale
    rows.update(dep.wait_finished(second, timeout=240))
    msgs = wait_messages(dep, [str(i) for i in [*first, *second]])
    assert rows[second[0]].status == "done" and rows[second[0]].work["reuse_listing_id"] is not None
    assert rows[second[1]].inbox == "stale" and msgs[str(second[1])]["code"] == "stale_version"
    with engine.connect() as conn:
        per_tenant = dict(conn.execute(text("SELECT tenant_id, count(*) FROM listings WHERE tenant_id = ANY(:t)"
                                            " GROUP BY tenant_id"), {"t": tenants}).all())
        images = dict(conn.execute(text("SELECT tenant_id, count(*) FROM images WHERE tenant_id = ANY(:t)"
                                        " GROUP BY tenant_id"), {"t": tenants}).all())
        reused_from = conn.execute(text("SELECT s.tenant_id FROM listings l JOIN listings s ON s.id = l.id"
                                        " WHERE l.id = (SELECT (work->>'reuse_listing_id')::bigint FROM enrichment_jobs"
                                        " WHERE event_id = :e)"), {"e": second[0]}).scalar_one()
        pending = conn.execute(text("SELECT count(*) FROM outbox WHERE tenant_id = ANY(:t) AND published_at IS NULL"),
                               {"t": tenants}).scalar_one()
    assert per_tenant == {tenants[0]: 2, tenants[1]: 2}
    assert images == {tenants[0]: 2, tenants[1]: 1}  # the shared photo is one row per tenant
    assert reused_from == tenants[1]  # reuse never crosses tenants
    assert pending == 0
    assert {msgs[str(e)]["tenant_id"] for e in first[:1]} == {tenants[0]}
    assert {msgs[str(e)]["tenant_id"] for e in (first[1], second[0])} == {tenants[1]}
