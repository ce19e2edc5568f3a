"""Fetch the product images that merchant events name, refusing anything aimed inside.

Image URLs are written by merchants, so they are hostile input: a URL may point at the cloud
metadata service, at a loopback admin port, at a host whose DNS answer is private, or at another
merchant's S3 prefix. Every fetch passes one policy (``FetchPolicy``) and one choke point per
scheme; the I/O-free URL and address rules live in ``tasks.io.url_policy``. For HTTP(S) the host is
resolved once, every answer is vetted, and the connection goes to the vetted address itself (DNS
rebinding cannot swap it), with the hostname kept for the Host header, TLS SNI and certificate
verification. Redirects are followed by hand and re-vetted.
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

from tasks.errors import ErrorCode, PipelineError, TransientError
from tasks.io.url_policy import (
    MAX_URL_LENGTH as MAX_URL_LENGTH,  # re-exported for callers that import it from here
    S3_BUCKET,
    IPAddress,
    has_control,
    ip_literal,
    is_public_address,
    normalise_host,
    port_of,
    refused,
    safe_segment,
    scheme_of,
    split_web_url,
)

Resolver = Callable[..., Sequence[tuple[Any, ...]]]  # socket.getaddrinfo's shape

ALLOWED_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/webp"})
_READ_CHUNK = 64 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_RETRYABLE_4XX = frozenset({408, 429})  # the server asks us to come back later
_USER_AGENT = "catalog-enrich-fetcher/1"


@dataclass(frozen=True)
class FetchPolicy:
    """What a fetch may touch. Defaults are production-safe; tests and demos loosen them explicitly."""

    allow_file_urls: bool = False
    allow_private_addresses: bool = False
    allow_http: bool = False
    allowed_buckets: tuple[str, ...] = ()
    require_merchant_prefix: bool = True
    max_bytes: int = 20 * 1024 * 1024
    timeout_s: float = 10.0
    total_timeout_s: float = 30.0
    max_redirects: int = 3
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    file_roots: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.timeout_s <= 0 or self.total_timeout_s <= 0:
            raise ValueError("max_bytes, timeout_s and total_timeout_s must be positive")
        if self.max_redirects < 0:
            raise ValueError("max_redirects must be >= 0")


@dataclass
class FetchedImage:
    """Raw bytes as served; decoding (not fetching) decides whether they really are an image."""

    data: bytes
    content_type: str | None
    final_url: str


@dataclass(frozen=True)
class VettedTarget:
    """An HTTP(S) URL whose host passed the policy, with the one address we will connect to."""

    url: str
    scheme: str
    host: str
    port: int
    request_target: str
    address: str


class _Deadline:
    """A hard wall-clock limit for one fetch, redirects included.

    http.client only has per-read timeouts, so a server dripping one byte per read would hold a
    worker forever; a timer shuts the current socket down when the limit passes.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._expires_at = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()
        self.fired = False

    def remaining(self) -> float:
        return self._expires_at - time.monotonic()

    def expired(self) -> bool:
        return self.fired or self.remaining() <= 0

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
            if self.fired:
                _shutdown(sock)

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            if self._sock is not None:
                _shutdown(self._sock)

    def cancel(self) -> None:
        self._timer.cancel()

    def error(self) -> PipelineError:
        return PipelineError(
            ErrorCode.image_fetch_failed, f"download exceeded the {self.seconds:g}s total time limit"
        )


def _shutdown(sock: socket.socket) -> None:
    # The plain-socket shutdown: SSLSocket.shutdown would also drop its SSL object under a reader.
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to an already-vetted address that still speaks to the hostname."""

    def __init__(
        self, target: VettedTarget, deadline: _Deadline, timeout: float, tls: ssl.SSLContext | None
    ) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self.default_port = 443 if tls is not None else 80  # Host header omits the default port
        self._address = target.address
        self._deadline = deadline
        self._tls = tls

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self._deadline.watch(sock)
        if self._tls is not None:
            sock = self._tls.wrap_socket(sock, server_hostname=self.host)
            self._deadline.watch(sock)
        self.sock = sock


class ImageFetcher:
    """Fetches one image URL under a ``FetchPolicy``; errors carry the pipeline's error codes."""

    def __init__(
        self,
        policy: FetchPolicy,
        *,
        resolver: Resolver = socket.getaddrinfo,
        s3_client_factory: Callable[[], Any] | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.policy = policy
        self._resolver = resolver
        self._s3_client_factory = s3_client_factory or self._default_s3_client
        self._s3_client: Any = None
        self._s3_lock = threading.Lock()
        self._tls = tls_context or ssl.create_default_context()

    def fetch(self, url: str, *, tenant_id: str, merchant_id: str) -> FetchedImage:
        """Return the bytes ``url`` names, or raise PipelineError/TransientError with a code."""
        scheme = scheme_of(url)
        if scheme in ("http", "https"):
            return self._fetch_web(url)
        if scheme == "s3":
            return self._fetch_s3(url, tenant_id, merchant_id)
        if scheme == "file":
            return self._fetch_file(url)
        raise refused(f"URL scheme '{scheme}' is not allowed")

    # --- HTTP(S) -------------------------------------------------------------------------------

    def vet_web_url(self, url: str) -> VettedTarget:
        """Check an http(s) URL against the policy and resolve it once, without connecting."""
        parts = split_web_url(url, allow_http=self.policy.allow_http)
        host = normalise_host(parts.hostname or "", allow_private=self.policy.allow_private_addresses)
        port = port_of(parts)
        addresses = self._addresses(host, port)
        if not self.policy.allow_private_addresses and not all(map(is_public_address, addresses)):
            raise refused(f"host {host} is not a public address")
        path = parts.path or "/"
        target = f"{path}?{parts.query}" if parts.query else path
        clean_url = parts._replace(fragment="").geturl()
        return VettedTarget(clean_url, parts.scheme, host, port, target, str(addresses[0]))

    def vet_redirect(self, current: VettedTarget, location: str) -> VettedTarget:
        """A redirect is a new merchant-controlled URL: it passes every check the first one did."""
        if not location or any(c.isspace() for c in location.strip()):
            raise PipelineError(ErrorCode.image_fetch_failed, f"bad redirect from {current.host}")
        return self.vet_web_url(urljoin(current.url, location.strip()))

    def _addresses(self, host: str, port: int) -> list[IPAddress]:
        literal = ip_literal(host)
        if literal is not None:
            return [literal]
        try:
            answers = self._resolver(host, port, 0, socket.SOCK_STREAM)
        except socket.gaierror as exc:
            if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
                raise PipelineError(ErrorCode.image_fetch_failed, f"host {host} does not resolve") from None
            raise TransientError(ErrorCode.image_fetch_failed, f"DNS lookup for {host} failed") from None
        except (UnicodeError, ValueError):
            raise refused("invalid host name") from None
        addresses = [
            ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            for family, _, _, _, sockaddr in answers
            if family in (socket.AF_INET, socket.AF_INET6)
        ]
        if not addresses:
            raise PipelineError(ErrorCode.image_fetch_failed, f"host {host} has no addresses")
        return addresses

    def _fetch_web(self, url: str) -> FetchedImage:
        deadline = _Deadline(self.policy.total_timeout_s)
        try:
            target = self.vet_web_url(url)
            for _ in range(self.policy.max_redirects + 1):
                outcome = self._request(target, deadline)
                if isinstance(outcome, FetchedImage):
                    return outcome
                target = self.vet_redirect(target, outcome)
            raise PipelineError(
                ErrorCode.image_fetch_failed, f"more than {self.policy.max_redirects} redirects"
            )
        finally:
            deadline.cancel()

    def _request(self, target: VettedTarget, deadline: _Deadline) -> FetchedImage | str:
        """One hop: the image, or the Location to follow next."""
        if deadline.expired():
            raise deadline.error()
        timeout = min(self.policy.timeout_s, deadline.remaining())
        tls = self._tls if target.scheme == "https" else None
        conn = _PinnedConnection(target, deadline, timeout, tls)
        try:
            conn.request("GET", target.request_target, headers=_REQUEST_HEADERS)
            response = conn.getresponse()
            if deadline.expired():  # the watchdog's shutdown reads as a short, valid-looking header block
                raise deadline.error()
            if response.status in _REDIRECTS:
                location = response.getheader("Location")
                if location is None:
                    detail = f"redirect without Location from {target.host}"
                    raise PipelineError(ErrorCode.image_fetch_failed, detail)
                return location
            _check_status(response.status, target.host)
            content_type = _check_headers(response, self.policy.max_bytes)
            data = self._read_body(response, conn, deadline)
            return FetchedImage(data, content_type, target.url)
        except PipelineError:
            raise
        except ssl.SSLCertVerificationError:
            detail = f"TLS certificate of {target.host} not valid"
            raise PipelineError(ErrorCode.image_fetch_failed, detail) from None
        except (OSError, http.client.HTTPException) as exc:
            if deadline.expired():
                raise deadline.error() from None
            kind = "timed out" if isinstance(exc, TimeoutError) else "connection failed"
            raise TransientError(ErrorCode.image_fetch_failed, f"{target.host}: {kind}") from None
        finally:
            conn.close()

    def _read_body(
        self, response: http.client.HTTPResponse, conn: _PinnedConnection, deadline: _Deadline
    ) -> bytes:
        """Read in chunks under a byte cap and the overall deadline, and catch a lying length."""
        declared = response.length
        body = bytearray()
        while True:
            if deadline.expired():
                raise deadline.error()
            if conn.sock is not None:
                conn.sock.settimeout(max(0.001, min(self.policy.timeout_s, deadline.remaining())))
            chunk = response.read1(_READ_CHUNK)
            if not chunk:
                break
            body += chunk
            if len(body) > self.policy.max_bytes:
                raise PipelineError(
                    ErrorCode.image_rejected, f"body exceeds the {self.policy.max_bytes} byte limit"
                )
        if deadline.expired():  # the watchdog closing the socket looks like end-of-body
            raise deadline.error()
        if declared is not None and len(body) < declared:
            raise TransientError(
                ErrorCode.image_fetch_failed,
                f"body ended after {len(body)} of {declared} declared bytes",
            )
        return bytes(body)

    # --- S3 --------------------------------------------------------------------------------------

    def _fetch_s3(self, url: str, tenant_id: str, merchant_id: str) -> FetchedImage:
        bucket, key = self._vet_s3_url(url, tenant_id, merchant_id)
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            obj = self._s3().get_object(Bucket=bucket, Key=key)
            body = obj["Body"]
            try:
                size = obj.get("ContentLength")
                if size is not None and size > self.policy.max_bytes:
                    raise _too_large(self.policy.max_bytes)
                data = body.read(self.policy.max_bytes + 1)
            finally:
                body.close()
        except ClientError as exc:
            raise _s3_client_error(exc, bucket) from None
        except BotoCoreError as exc:
            detail = f"S3 unavailable: {type(exc).__name__}"
            raise TransientError(ErrorCode.image_fetch_failed, detail) from None
        if len(data) > self.policy.max_bytes:
            raise _too_large(self.policy.max_bytes)
        return FetchedImage(data, obj.get("ContentType"), f"s3://{bucket}/{key}")

    def _vet_s3_url(self, url: str, tenant_id: str, merchant_id: str) -> tuple[str, str]:
        bucket, _, key = url[len("s3://") :].partition("/")
        if not S3_BUCKET.match(bucket) or bucket not in self.policy.allowed_buckets:
            raise refused(f"S3 bucket '{bucket[:63]}' is not allowed")
        unsafe = ".." in key or "//" in key or "\\" in key or key.startswith("/")
        if not key or len(key) > 1024 or unsafe or has_control(key):
            raise refused("S3 key is not allowed")
        if self.policy.require_merchant_prefix:
            if not (safe_segment(tenant_id) and safe_segment(merchant_id)):
                raise refused("tenant or merchant id unusable as an S3 prefix")
            prefix = f"{tenant_id}/{merchant_id}/"
            if not key.startswith(prefix) or key == prefix:
                raise refused("S3 key is outside the merchant's prefix")
        return bucket, key

    def _s3(self) -> Any:
        with self._s3_lock:  # boto3 clients are thread-safe once built; building one is not
            if self._s3_client is None:
                self._s3_client = self._s3_client_factory()
            return self._s3_client

    def _default_s3_client(self) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(
            connect_timeout=self.policy.timeout_s,
            read_timeout=self.policy.timeout_s,
            retries={"max_attempts": 2, "mode": "standard"},  # task-level retries back off further
        )
        return boto3.client(
            "s3", endpoint_url=self.policy.s3_endpoint_url, region_name=self.policy.s3_region, config=config
        )

    # --- file ------------------------------------------------------------------------------------

    def _fetch_file(self, url: str) -> FetchedImage:
        if not self.policy.allow_file_urls:
            raise refused("file URLs are not allowed")
        parts = urlsplit(url)
        path = unquote(parts.path)
        if parts.netloc not in ("", "localhost") or not path.startswith("/") or "\x00" in path:
            raise refused("file URL must be an absolute local path")
        real = os.path.realpath(path)
        roots = [os.path.realpath(r) for r in self.policy.file_roots]
        if roots and not any(os.path.commonpath([real, r]) == r for r in roots):
            raise refused("file is outside the allowed roots")
        return FetchedImage(self._read_file(real), None, f"file://{real}")

    def _read_file(self, path: str) -> bytes:
        # O_NOFOLLOW: the final component cannot be swapped for a symlink after realpath checked it.
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            raise PipelineError(ErrorCode.image_fetch_failed, "file not found") from None
        except OSError as exc:
            raise PipelineError(ErrorCode.image_fetch_failed, f"file unreadable: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):  # devices, FIFOs, directories: never an image
                raise PipelineError(ErrorCode.image_fetch_failed, "not a regular file")
            if info.st_size > self.policy.max_bytes:
                raise _too_large(self.policy.max_bytes)
            with os.fdopen(fd, "rb", closefd=False) as fh:
                data = fh.read(self.policy.max_bytes + 1)
        finally:
            os.close(fd)
        if len(data) > self.policy.max_bytes:
            raise _too_large(self.policy.max_bytes)
        return data


_REQUEST_HEADERS = {
    "User-Agent": _USER_AGENT,
    "Accept": ", ".join(sorted(ALLOWED_IMAGE_TYPES)),
    "Accept-Encoding": "identity",  # compressed bodies would dodge the byte cap
    "Connection": "close",
}

def _check_status(status: int, host: str) -> None:
    if status == 200:
        return
    if 500 <= status <= 599 or status in _RETRYABLE_4XX:
        raise TransientError(ErrorCode.image_fetch_failed, f"HTTP {status} from {host}")
    raise PipelineError(ErrorCode.image_fetch_failed, f"HTTP {status} from {host}")


def _check_headers(response: http.client.HTTPResponse, max_bytes: int) -> str:
    """Refuse by headers alone, before a byte of body is read."""
    raw_type = response.getheader("Content-Type") or ""
    content_type = raw_type.split(";", 1)[0].strip().lower()
    if content_type not in ALLOWED_IMAGE_TYPES:
        shown = content_type[:60] or "none"
        raise PipelineError(ErrorCode.image_rejected, f"content type {shown} is not an allowed image type")
    encoding = (response.getheader("Content-Encoding") or "identity").strip().lower()
    if encoding != "identity":
        raise PipelineError(ErrorCode.image_rejected, "compressed response bodies are not accepted")
    if response.length is not None and response.length > max_bytes:
        raise _too_large(max_bytes)
    return content_type


def _too_large(max_bytes: int) -> PipelineError:
    return PipelineError(ErrorCode.image_rejected, f"image larger than the {max_bytes} byte limit")


def _s3_client_error(exc: Any, bucket: str) -> PipelineError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    if code in ("NoSuchKey", "NotFound", "404"):
        return PipelineError(ErrorCode.image_fetch_failed, f"S3 object not found in {bucket}")
    transient_codes = {"SlowDown", "Throttling", "RequestTimeout", "InternalError", "ServiceUnavailable"}
    if status >= 500 or code in transient_codes:
        return TransientError(ErrorCode.image_fetch_failed, f"S3 error {code or status}")
    return PipelineError(ErrorCode.image_fetch_failed, f"S3 error {code or status} for bucket {bucket}")
