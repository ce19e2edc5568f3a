"""``enrich images backfill-hashes`` as an operator runs it: a real subprocess whose login is only
granted ``enrich_admin`` (the README's instruction for maintenance commands), against images two
tenants' fetch stages committed and whose trimmed/centre hashes were then emptied, as on rows
stored before migration 0009; and the fetch stage, which finds a copy after the backfill that it
missed before."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from db.engine import make_engine
from models.hashing import candidate_hashes
from tasks.pipeline.fetch import fetch_and_dedup
from tests.conftest import ADMIN_ROLE, WORKER_ROLE, login_role, own_database
from tests.security.test_maintenance_role import enrich
from tests.tasks.pipeline.test_fetch_dedup import PhotoFetcher, _runtime, _seed_job, _seed_tenant, _url

pg_url, engine = own_database("image_hashes_cli")  # committed rows of its own

HASH_COLUMNS = ("phash_trimmed", "dhash_trimmed", "phash_centre", "dhash_centre")


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92)
    return buf.getvalue()


def _hash_columns(s: Session) -> dict[int, tuple]:
    rows = s.execute(text(f"SELECT id, {', '.join(HASH_COLUMNS)} FROM images ORDER BY id")).all()
    return {r[0]: tuple(r[1:]) for r in rows}


@pytest.fixture(scope="module")
def database(pg_url: str, engine: Engine, sample_photos: list[tuple[Path, str]],
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """Tenant a stored a photo letterboxed to a square on white (product ``orig``) and has a job
    for its plain copy (``copy``, not run yet); tenant b stored two other photos, one of whose
    originals was later lost. Then every row's trimmed/centre hashes are emptied."""
    data_dir = tmp_path_factory.mktemp("image_hashes_cli")
    original = Image.open(sample_photos[16][0]).convert("RGB")
    side = max(original.size)
    padded = Image.new("RGB", (side, side), (255, 255, 255))
    padded.paste(original, (0, 0))
    fetcher = PhotoFetcher()
    fetcher.photos = {_url("padded"): _jpeg(padded), _url("copy"): _jpeg(original),
                      _url("b1"): sample_photos[3][0].read_bytes(),
                      _url("b2"): sample_photos[7][0].read_bytes()}
    a, b = f"hash-a-{uuid.uuid4().hex[:6]}", f"hash-b-{uuid.uuid4().hex[:6]}"
    with Session(engine) as s, s.begin():  # seeded as the superuser; the stages run as enrich_worker
        _seed_tenant(s, a)
        _seed_tenant(s, b)
        orig = _seed_job(s, a, "orig", [_url("padded")])
        copy = _seed_job(s, a, "copy", [_url("copy")])
        b1, b2 = _seed_job(s, b, "b1", [_url("b1")]), _seed_job(s, b, "b2", [_url("b2")])
    worker = make_engine(pg_url, pool_size=2, runtime_role=WORKER_ROLE)
    runtime = _runtime(sessionmaker(bind=worker, expire_on_commit=False), data_dir / "originals", fetcher)
    for job in (orig, b1, b2):
        assert fetch_and_dedup(runtime, job, f"t-{job}").next_stage is not None
    with Session(engine) as s, s.begin():
        s.execute(text(f"UPDATE images SET {', '.join(f'{c} = NULL' for c in HASH_COLUMNS)}"))
        ids = dict(s.execute(text("SELECT p.external_id, pi.image_id FROM product_images pi "
                                  "JOIN products p ON p.id = pi.product_id")).all())
        lost = s.execute(text("SELECT storage_uri FROM images WHERE id = :i"), {"i": ids["b2"]}).scalar_one()
    Path(lost.removeprefix("file://")).unlink()
    with login_role(pg_url, member_of=(ADMIN_ROLE,), inherit=False) as admin_url:
        yield SimpleNamespace(engine=engine, worker=worker, runtime=runtime, admin_url=admin_url,
                              data_dir=data_dir, ids=ids, copy_job=copy, tenant_b=b, lost=lost)
    worker.dispose()


def _copy_duplicates(db: SimpleNamespace, *, keep: bool) -> list[tuple[str, str | None]]:
    """Run the fetch stage of product ``copy``; ``keep=False``: on a connection whose transaction
    is rolled back afterwards, so the job can run again later."""
    if keep:
        outcome = fetch_and_dedup(db.runtime, db.copy_job, "t-copy")
        return [(d.kind, d.duplicate_of_product) for d in outcome.duplicates]
    with db.worker.connect() as conn:
        outer = conn.begin()
        rolled_back = sessionmaker(bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False)
        probe = _runtime(rolled_back, db.data_dir / "originals", db.runtime.fetcher)
        try:
            outcome = fetch_and_dedup(probe, db.copy_job, "t-probe")
        finally:
            outer.rollback()
    assert outcome.next_stage is not None
    return [(d.kind, d.duplicate_of_product) for d in outcome.duplicates]


def test_backfill_fills_every_tenant_reports_lost_originals_and_then_dedup_finds_the_copy(
        database: SimpleNamespace) -> None:
    db = database
    # Before: the letterboxed original is compared by its plain hashes only, too far from the copy.
    assert _copy_duplicates(db, keep=False) == []

    dry = enrich(db.admin_url, db.data_dir, "images", "backfill-hashes", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout) == {"todo": 3}

    run = enrich(db.admin_url, db.data_dir, "images", "backfill-hashes", "--batch-size", "1")
    assert run.returncode == 1, run.stderr  # an original is gone: reported, and the status says so
    assert "filled the hashes of 2 of 3 images in 3 batches" in run.stdout
    assert (f"image {db.ids['b2']} (tenant {db.tenant_b}): missing: stored blob is "
            f"missing [{db.lost}]") in run.stdout
    assert "... 3/3 rows: filled 2, not filled 1" in run.stderr  # progress, one line per batch
    with Session(db.engine) as s:
        after = _hash_columns(s)
    want = candidate_hashes(Image.open(io.BytesIO(db.runtime.fetcher.photos[_url("padded")])).convert("RGB"))
    assert after[db.ids["orig"]] == (want.trimmed.phash, want.trimmed.dhash,
                                     want.centre.phash, want.centre.dhash)
    assert all(v is not None for v in after[db.ids["b1"]]) and after[db.ids["b2"]] == (None,) * 4

    again = enrich(db.admin_url, db.data_dir, "images", "backfill-hashes", "--json")
    assert again.returncode == 1, again.stderr
    report = json.loads(again.stdout)
    assert (report["todo"], report["filled"], report["already"]) == (1, 0, 0)
    assert [(u["image_id"], u["reason"]) for u in report["unfilled"]] == [(db.ids["b2"], "missing")]
    with Session(db.engine) as s:
        assert _hash_columns(s) == after  # the second run changed nothing

    # After: the same fetch stage now finds the letterboxed original of tenant a.
    assert _copy_duplicates(db, keep=True) == [("near", "orig")]


def test_a_login_without_the_maintenance_role_gets_a_one_line_error(database: SimpleNamespace,
                                                                    tmp_path: Path) -> None:
    server = database.engine.url.render_as_string(hide_password=False)
    with login_role(server, member_of=(WORKER_ROLE,)) as url:
        res = enrich(url, tmp_path, "images", "backfill-hashes")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "enrich_admin" in res.stderr
