"""Blob storage: idempotent atomic writes, no reads outside the store, S3 round trip on a local moto."""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tasks.errors import ErrorCode, PipelineError, TransientError
from tasks.io.blobs import LocalBlobStore, S3BlobStore, open_blob_store, original_key, result_key

SHA = hashlib.sha256(b"photo").hexdigest()
BUCKET = "storage-test-blobs"


def test_keys_are_content_addressed_and_safe() -> None:
    assert original_key("t1", SHA) == f"originals/t1/{SHA[:2]}/{SHA}"
    assert result_key(42) == "results/42"
    for tenant, sha in [("t1", "ABC"), ("t1", SHA.upper()), ("../t2", SHA), ("t1/x", SHA), ("", SHA)]:
        with pytest.raises(ValueError):
            original_key(tenant, sha)
    for job_id in (-1, True, "7"):
        with pytest.raises(ValueError):
            result_key(job_id)  # type: ignore[arg-type]


def test_local_put_get_is_idempotent(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    key = original_key("t1", SHA)
    assert not store.exists(key)
    uri = store.put(key, b"photo")
    assert uri == store.uri_for(key) and uri.startswith("file://")
    assert store.put(key, b"photo") == uri
    assert store.get(uri) == b"photo"
    assert store.exists(key)
    assert not list((tmp_path / "blobs").rglob(".tmp-*"))


def test_local_put_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that dies before the rename leaves the previous blob whole and no temp file behind."""
    store = LocalBlobStore(tmp_path)
    uri = store.put("results/1", b"old")

    def crash(*args: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.put("results/1", b"new content")
    monkeypatch.undo()
    assert store.get(uri) == b"old"
    assert not list(tmp_path.rglob(".tmp-*"))


@pytest.mark.parametrize("key", ["", "/etc/passwd", "../x", "a/../../x", "a//b", "a\\b", "a/./b", "a/\x00b"])
def test_local_put_refuses_unsafe_keys(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError):
        LocalBlobStore(tmp_path).put(key, b"x")


def test_local_get_refuses_uris_outside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    store = LocalBlobStore(root)
    store.put("results/1", b"ok")
    secret = tmp_path / "secret"
    secret.write_bytes(b"secret")
    (root / "results" / "link").symlink_to(secret)
    for uri in [
        secret.as_uri(),
        f"file://{root}/../secret",
        f"file://{root}/results/..%2F..%2Fsecret",
        str(secret),
        "../secret",
        (root / "results" / "link").as_uri(),
        root.as_uri(),
        f"file://otherhost{root}/results/1",
        "s3://bucket/results/1",
        "http://127.0.0.1/results/1",
    ]:
        with pytest.raises(PipelineError) as excinfo:
            store.get(uri)
        assert excinfo.value.code == ErrorCode.url_not_allowed, uri
    assert store.get("results/1") == b"ok"
    assert store.get(str(root / "results" / "1")) == b"ok"


def test_local_get_of_a_missing_blob_is_a_permanent_internal_error(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    with pytest.raises(PipelineError) as excinfo:
        store.get(store.uri_for("results/9"))
    assert excinfo.value.code == ErrorCode.internal_error and not excinfo.value.retryable


def test_open_blob_store_picks_the_backend(tmp_path: Path) -> None:
    assert isinstance(open_blob_store(str(tmp_path / "a"), s3_client_factory=None), LocalBlobStore)
    assert isinstance(open_blob_store((tmp_path / "b").as_uri(), s3_client_factory=None), LocalBlobStore)
    store = open_blob_store("s3://bucket/some/prefix/", s3_client_factory=lambda: "client")
    assert isinstance(store, S3BlobStore)
    assert (store.bucket, store.prefix, store.client) == ("bucket", "some/prefix", "client")
    with pytest.raises(ValueError):
        open_blob_store("ftp://host/x", s3_client_factory=None)


# --- S3 on a local moto server -------------------------------------------------------------------------


def s3_client(endpoint: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
        aws_secret_access_key="test",
        config=Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1}),
    )


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    s3_client(endpoint).create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


def test_s3_round_trip(moto_endpoint: str) -> None:
    store = open_blob_store(f"s3://{BUCKET}/originals-v1", s3_client_factory=lambda: s3_client(moto_endpoint))
    key = original_key("t1", SHA)
    assert not store.exists(key)
    uri = store.put(key, b"photo")
    assert uri == store.uri_for(key) == f"s3://{BUCKET}/originals-v1/{key}"
    assert store.put(key, b"photo") == uri
    assert store.exists(key)
    assert store.get(uri) == b"photo"


def test_s3_get_refuses_uris_outside_bucket_and_prefix(moto_endpoint: str) -> None:
    client = s3_client(moto_endpoint)
    client.put_object(Bucket=BUCKET, Key="elsewhere/secret", Body=b"secret")
    store = S3BlobStore(client, BUCKET, "tenant-store")
    for uri in [
        f"s3://{BUCKET}/elsewhere/secret",
        f"s3://{BUCKET}/tenant-store/../elsewhere/secret",
        f"s3://{BUCKET}/tenant-store//x",
        f"s3://{BUCKET}-other/tenant-store/x",
        f"s3://{BUCKET}",
        "file:///etc/passwd",
    ]:
        with pytest.raises(PipelineError) as excinfo:
            store.get(uri)
        assert excinfo.value.code == ErrorCode.url_not_allowed, uri


def test_s3_missing_blob_is_permanent(moto_endpoint: str) -> None:
    store = S3BlobStore(s3_client(moto_endpoint), BUCKET, "p")
    with pytest.raises(PipelineError) as excinfo:
        store.get(store.uri_for("results/404"))
    assert excinfo.value.code == ErrorCode.internal_error and not excinfo.value.retryable


def test_s3_outage_is_transient() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    store = S3BlobStore(s3_client(f"http://127.0.0.1:{port}"), BUCKET, "p")
    for call in (lambda: store.put("results/1", b"x"), lambda: store.exists("results/1"),
                 lambda: store.get(store.uri_for("results/1"))):
        with pytest.raises(TransientError) as excinfo:
            call()
        assert excinfo.value.code == ErrorCode.internal_error
