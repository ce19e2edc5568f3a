"""Result documents in real object storage (a local moto S3 server): the stores' batched delete, and
the pruner deleting finished jobs' documents from S3 while a live job's stays."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from tasks.io.blobs import LocalBlobStore, S3BlobStore, open_blob_store, result_key
from tasks.maintenance.retention import RetentionPolicy, run_retention
from tests.conftest import WORKER_ROLE, as_role
from tests.db.catalog_rows import add_products, add_tenant
from tests.tasks.io.test_blobs import BUCKET, moto_endpoint, s3_client  # noqa: F401  (moto_endpoint: fixture)
from tests.tasks.maintenance.bookkeeping_rows import DAY, add_job


def _keys(endpoint: str, prefix: str) -> set[str]:
    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def test_s3_delete_goes_in_requests_of_a_thousand_and_ignores_missing_keys(moto_endpoint: str) -> None:  # noqa: F811
    store = S3BlobStore(s3_client(moto_endpoint), BUCKET, "deletes")
    keys = [result_key(n) for n in range(1_005)]
    for key in keys:
        store.put(key, b"{}")
    assert store.delete([*keys, result_key(10**9)]) == 1_006  # more than one request; a missing key is no error
    assert _keys(moto_endpoint, "deletes/") == set()


def test_local_delete_counts_what_was_there(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    store.put(result_key(1), b"{}")
    assert store.delete([result_key(1), result_key(2)]) == 1
    assert not store.exists(result_key(1))


def test_the_pruner_deletes_finished_jobs_documents_from_s3(db_session: Session,
                                                           moto_endpoint: str) -> None:  # noqa: F811
    s = db_session
    add_tenant(s, "s3-ret")
    finished_p, live_p = add_products(s, "s3-ret", ["done", "live"], ["hat", "hat"])
    finished, _ = add_job(s, "s3-ret", finished_p, status="done", created=DAY, finished=2 * timedelta(hours=1),
                          ran_model=True)
    live, _ = add_job(s, "s3-ret", live_p, status="running", created=DAY, ran_model=True)
    store = open_blob_store(f"s3://{BUCKET}/v1", s3_client_factory=lambda: s3_client(moto_endpoint))
    for job in (finished, live):
        store.put(result_key(job), b'{"listing": "result"}')
    factory = sessionmaker(bind=s.connection(), join_transaction_mode="create_savepoint", expire_on_commit=False)
    with as_role(s, WORKER_ROLE):
        report = run_retention(factory, store, RetentionPolicy(), passes=("result_documents",))
    assert report.deleted["result_documents"] == 1  # S3 deletes are counted as asked (quiet mode)
    assert _keys(moto_endpoint, "v1/results/") == {f"v1/{result_key(live)}"}
