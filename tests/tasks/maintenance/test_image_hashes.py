"""The hash backfill's run (``tasks.maintenance.image_hashes``) as the maintenance role under forced
row-level security: what it fills, what it reports (original gone, bytes not matching their
sha256, bytes that no longer decode), batches and ``limit``."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from db.tables import Tenant
from models.hashing import candidate_hashes, sha256_hex
from models.images import ImageLimits
from tasks.io.blobs import LocalBlobStore, original_key
from tasks.maintenance.image_hashes import HashBackfillReport, backfill_image_hashes
from tests.conftest import ADMIN_ROLE, as_role

TENANT = "hb-run"


def _png(colour: tuple[int, int, int]) -> bytes:
    img = Image.new("RGB", (48, 40), colour)
    img.paste((0, 0, 0), (10, 8, 30, 30))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _stored(session: Session, blobs: LocalBlobStore, data: bytes, *, sha: str | None = None,
            write: bytes | None = None) -> int:
    sha = sha or sha256_hex(data)
    uri = blobs.put(original_key(TENANT, sha), data if write is None else write)
    return session.execute(text(
        "INSERT INTO images (tenant_id, sha256, phash, dhash, width, height, byte_size, format, storage_uri)"
        " VALUES (:t, :s, CAST(:z AS bit(64)), CAST(:z AS bit(64)), 48, 40, 1, 'PNG', :u) RETURNING id"),
        {"t": TENANT, "s": sha, "z": "0" * 64, "u": uri}).scalar_one()


def test_fills_reports_and_stops_at_the_limit(db_session: Session, tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs")
    good, other = _png((200, 30, 30)), _png((30, 200, 30))
    junk = b"not an image at all"
    with as_role(db_session, None):  # seeded as the superuser
        db_session.add(Tenant(id=TENANT))
        db_session.flush()
        ok = _stored(db_session, blobs, good)
        mismatch = _stored(db_session, blobs, other, write=good)  # the blob's bytes are not its sha's
        undecodable = _stored(db_session, blobs, junk)
        second = _stored(db_session, blobs, _png((30, 30, 200)))
    factory = sessionmaker(bind=db_session.connection(), join_transaction_mode="create_savepoint")
    seen: list[int] = []

    def on_batch(report: HashBackfillReport) -> None:
        seen.append(report.looked_at)

    with as_role(db_session, ADMIN_ROLE):
        first = backfill_image_hashes(factory, blobs.get, ImageLimits(), batch_size=2, limit=3,
                                      on_batch=on_batch)
        assert (first.todo, first.filled, first.batches, seen) == (4, 1, 2, [2, 3])
        assert [(u.image_id, u.reason) for u in first.unfilled] == [(mismatch, "mismatch"),
                                                                    (undecodable, "undecodable")]
        rest = backfill_image_hashes(factory, blobs.get, ImageLimits(), batch_size=2)
        assert (rest.todo, rest.filled) == (3, 1)  # the limit stopped before the last row; reported ones stay
        assert sorted(u.image_id for u in rest.unfilled) == [mismatch, undecodable]
    with as_role(db_session, None):
        row = db_session.execute(text("SELECT phash_trimmed, dhash_trimmed, phash_centre, dhash_centre "
                                      "FROM images WHERE id = :i"), {"i": ok}).one()
        missing = db_session.execute(text("SELECT count(*) FROM images WHERE phash_centre IS NULL AND id IN "
                                          "(:a, :b, :c)"),
                                     {"a": mismatch, "b": undecodable, "c": second}).scalar_one()
    want = candidate_hashes(Image.open(io.BytesIO(good)).convert("RGB"))
    assert tuple(row) == (want.trimmed.phash, want.trimmed.dhash, want.centre.phash, want.centre.dhash)
    assert missing == 2  # the two reported rows; ``second`` was filled by the second run
