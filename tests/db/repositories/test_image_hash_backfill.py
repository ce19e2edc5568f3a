"""The hash-backfill queries (``enrich images backfill-hashes``) as the maintenance role in the
system scope under forced row-level security: rows of every tenant lacking a trimmed or centre
hash, keyset paging, and a write that never overwrites a hash already there."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session

from db.repositories import images
from db.tables import Tenant
from tests.conftest import ADMIN_ROLE, as_role, in_system_scope

ZERO, ONE = "0" * 64, "1" * 64


def _row(session: Session, tenant: str, **hashes: str | None) -> int:
    cols = ("phash_trimmed", "dhash_trimmed", "phash_centre", "dhash_centre")
    values = {c: hashes.get(c) for c in cols}
    return session.execute(text(
        "INSERT INTO images (tenant_id, sha256, phash, dhash, width, height, byte_size, format, storage_uri, "
        + ", ".join(cols) + ") VALUES (:t, md5(random()::text) || md5(random()::text), CAST(:z AS bit(64)), "
        "CAST(:z AS bit(64)), 8, 8, 1, 'JPEG', 'file:///originals/x', "
        + ", ".join(f"CAST(:{c} AS bit(64))" for c in cols) + ") RETURNING id"),
        {"t": tenant, "z": ZERO, **values}).scalar_one()


def test_hashless_rows_of_every_tenant_paged_and_filled_without_overwriting(db_session: Session) -> None:
    with as_role(db_session, None):  # seeded as the superuser
        db_session.add_all([Tenant(id="hb-a"), Tenant(id="hb-b")])
        db_session.flush()
        old_a, old_b = _row(db_session, "hb-a"), _row(db_session, "hb-b")
        partial = _row(db_session, "hb-b", phash_trimmed=ONE)  # one hash there already (a concurrent write)
        complete = _row(db_session, "hb-a", phash_trimmed=ZERO, dhash_trimmed=ZERO, phash_centre=ZERO,
                        dhash_centre=ZERO)
    with in_system_scope(db_session, ADMIN_ROLE):
        assert images.count_hashless(db_session) == 3
        first = images.hashless_batch(db_session, after_id=0, limit=2)
        assert [(r.image_id, r.tenant_id) for r in first] == [(old_a, "hb-a"), (old_b, "hb-b")]
        rest = images.hashless_batch(db_session, after_id=first[-1].image_id, limit=2)
        assert [r.image_id for r in rest] == [partial]
        assert images.count_hashless(db_session, after_id=old_b) == 1

        # another tenant's row is never written
        assert not images.fill_hashes(db_session, "hb-a", partial, trimmed=(ONE, ONE), centre=(ONE, ONE))
        assert images.fill_hashes(db_session, "hb-b", partial, trimmed=(ZERO, ZERO), centre=(ZERO, ZERO))
        assert not images.fill_hashes(db_session, "hb-b", partial, trimmed=(ONE, ONE), centre=(ONE, ONE))
        assert not images.fill_hashes(db_session, "hb-a", complete, trimmed=(ONE, ONE), centre=(ONE, ONE))
        got = db_session.execute(text("SELECT phash_trimmed, dhash_trimmed, phash_centre, dhash_centre "
                                      "FROM images WHERE id IN (:p, :c) ORDER BY id"),
                                 {"p": partial, "c": complete}).all()
        assert [tuple(r) for r in got] == [(ONE, ZERO, ZERO, ZERO), (ZERO,) * 4]
        assert images.count_hashless(db_session) == 2
