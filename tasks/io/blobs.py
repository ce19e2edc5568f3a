"""Content-addressed blob storage for originals and job results: a local directory or an S3 prefix.

Messages carry storage URIs, never bytes, so ``get`` reads URIs that arrived over the broker:
it only serves URIs inside this store's own root or bucket prefix. Writes are idempotent (the
same key always names the same content) and atomic (a reader never sees half a blob).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from tasks.errors import ErrorCode, PipelineError, TransientError

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_S3_NOT_FOUND = frozenset({"NoSuchKey", "NotFound", "404"})
_S3_TRANSIENT = frozenset({"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable"})
_MISSING = "stored blob is missing"


class BlobStore(Protocol):
    """Where originals and results live; URIs returned by ``put`` are what messages carry."""

    def put(self, key: str, data: bytes) -> str: ...

    def get(self, uri: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def uri_for(self, key: str) -> str: ...

    def delete(self, keys: Sequence[str]) -> int: ...


def original_key(tenant_id: str, sha256: str) -> str:
    """Originals are keyed by content, per tenant, fanned out so no directory grows huge."""
    _check_segment(tenant_id, "tenant_id")
    if not _SHA256.match(sha256):
        raise ValueError("sha256 must be 64 lower-case hex digits")
    return f"originals/{tenant_id}/{sha256[:2]}/{sha256}"


def result_key(job_id: int) -> str:
    if isinstance(job_id, bool) or not isinstance(job_id, int) or job_id < 0:
        raise ValueError("job_id must be a non-negative integer")
    return f"results/{job_id}"


def check_key(key: str) -> str:
    """Keys are relative, slash-separated and free of anything that could climb out of the store."""
    if not key or key.startswith("/") or "\\" in key or len(key) > 1024:
        raise ValueError("blob key must be a relative path without backslashes")
    for segment in key.split("/"):
        _check_segment(segment, "blob key segment")
    return key


def _check_segment(segment: str, what: str) -> None:
    if segment in ("", ".", "..") or "/" in segment or "\\" in segment:
        raise ValueError(f"{what} is not a safe path segment")
    if any(ord(c) < 32 or ord(c) == 127 for c in segment):
        raise ValueError(f"{what} contains control characters")


def _outside(uri: str) -> PipelineError:
    return PipelineError(ErrorCode.url_not_allowed, "blob URI is outside this store")


class LocalBlobStore:
    """A directory; the default for the embedded setup and for tests."""

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.realpath(root))
        self.root.mkdir(parents=True, exist_ok=True)

    def uri_for(self, key: str) -> str:
        return (self.root / check_key(key)).as_uri()

    def put(self, key: str, data: bytes) -> str:
        path = self.root / check_key(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Temp file in the same directory, then rename: readers see the old blob or the whole new one.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path.as_uri()

    def get(self, uri: str) -> bytes:
        path = self._path_of(uri)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise PipelineError(ErrorCode.internal_error, _MISSING) from None
        except IsADirectoryError:
            raise _outside(uri) from None

    def exists(self, key: str) -> bool:
        return (self.root / check_key(key)).is_file()

    def delete(self, keys: Sequence[str]) -> int:
        """Remove these blobs (a missing one is already gone); how many were there."""
        removed = 0
        for key in keys:
            try:
                (self.root / check_key(key)).unlink()
                removed += 1
            except FileNotFoundError:
                pass
        return removed

    def _path_of(self, uri: str) -> Path:
        """Accept file:// URIs and plain paths, but only ones that resolve inside the root."""
        parts = urlsplit(uri)
        if parts.scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise _outside(uri)
            raw = unquote(parts.path)
        elif parts.scheme == "":
            raw = uri
        else:
            raise _outside(uri)
        if "\x00" in raw:
            raise _outside(uri)
        real = Path(os.path.realpath(raw if os.path.isabs(raw) else self.root / raw))
        if real == self.root or not real.is_relative_to(self.root):
            raise _outside(uri)
        return real


class S3BlobStore:
    """A bucket prefix; S3 writes are atomic per object, so no temp-and-rename is needed."""

    def __init__(self, client: Any, bucket: str, prefix: str = "") -> None:
        if not bucket or "/" in bucket:
            raise ValueError("bucket must be a bare bucket name")
        self.client = client
        self.bucket = bucket
        self.prefix = check_key(prefix.strip("/")) if prefix.strip("/") else ""

    def _object_key(self, key: str) -> str:
        key = check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._object_key(key)}"

    def put(self, key: str, data: bytes) -> str:
        object_key = self._object_key(key)
        self._call("put", lambda: self.client.put_object(Bucket=self.bucket, Key=object_key, Body=data))
        return f"s3://{self.bucket}/{object_key}"

    def get(self, uri: str) -> bytes:
        object_key = self._key_of(uri)

        def read() -> bytes:
            body = self.client.get_object(Bucket=self.bucket, Key=object_key)["Body"]
            try:
                return bytes(body.read())
            finally:
                body.close()

        return self._call("get", read)

    def exists(self, key: str) -> bool:
        object_key = self._object_key(key)
        try:
            self._call("head", lambda: self.client.head_object(Bucket=self.bucket, Key=object_key))
        except PipelineError as exc:
            if exc.detail == _MISSING:
                return False
            raise
        return True

    def delete(self, keys: Sequence[str]) -> int:
        """Remove these objects, up to 1,000 per request (a missing key is not an error in S3);
        how many were asked for. A key S3 could not delete fails the call (transient)."""
        object_keys = [self._object_key(k) for k in keys]
        for start in range(0, len(object_keys), 1000):
            chunk = [{"Key": k} for k in object_keys[start:start + 1000]]
            reply = self._call("delete", lambda chunk=chunk: self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": chunk, "Quiet": True}))
            errors = reply.get("Errors") or []
            if errors:
                first = errors[0]
                raise TransientError(ErrorCode.internal_error, f"blob store delete failed for {len(errors)} "
                                     f"objects: {first.get('Code')} ({first.get('Key')})")
        return len(object_keys)

    def _key_of(self, uri: str) -> str:
        if not uri.startswith(f"s3://{self.bucket}/"):
            raise _outside(uri)
        object_key = uri[len(f"s3://{self.bucket}/") :]
        try:
            check_key(object_key)
        except ValueError:
            raise _outside(uri) from None
        if self.prefix and not object_key.startswith(f"{self.prefix}/"):
            raise _outside(uri)
        return object_key

    def _call(self, action: str, fn: Callable[[], Any]) -> Any:
        """Storage outages are transient (internal_error, retried); a missing blob is a permanent bug."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn()
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code in _S3_NOT_FOUND or status == 404:
                raise PipelineError(ErrorCode.internal_error, _MISSING) from None
            reason = code or str(status)
            if status >= 500 or code in _S3_TRANSIENT:
                detail = f"blob store {action} failed: {reason}"
                raise TransientError(ErrorCode.internal_error, detail) from None
            raise PipelineError(ErrorCode.internal_error, f"blob store {action} refused: {reason}") from None
        except BotoCoreError as exc:
            raise TransientError(
                ErrorCode.internal_error, f"blob store {action} failed: {type(exc).__name__}"
            ) from None


def open_blob_store(uri: str, *, s3_client_factory: Callable[[], Any] | None = None) -> BlobStore:
    """``s3://bucket/prefix`` → S3BlobStore; a directory path or ``file://`` URI → LocalBlobStore."""
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        client = s3_client_factory() if s3_client_factory is not None else _default_s3_client()
        return S3BlobStore(client, bucket, prefix)
    parts = urlsplit(uri)
    if parts.scheme == "file":
        return LocalBlobStore(Path(unquote(parts.path)))
    if parts.scheme and len(parts.scheme) > 1:  # a one-letter "scheme" is a Windows drive
        raise ValueError(f"unsupported blob store URI scheme '{parts.scheme}'")
    return LocalBlobStore(Path(uri))


def _default_s3_client() -> Any:
    import boto3

    return boto3.client("s3")
