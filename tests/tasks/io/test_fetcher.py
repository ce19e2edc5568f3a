"""Image fetching under hostile input: every refusal happens before a connection, every lie is caught.

Loopback only. Refused URLs that name 127.0.0.1 point at a listener that counts connections; refused
URLs that name any other address run with ``socket.create_connection`` replaced by a trap, so even a
broken check could not send a packet off this machine. Names are resolved by injected resolvers.
"""

from __future__ import annotations

import datetime
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tasks.errors import ErrorCode, PipelineError, TransientError
from tasks.io.fetcher import FetchPolicy, ImageFetcher, is_public_address

LOCAL = FetchPolicy(allow_http=True, allow_private_addresses=True, max_bytes=1_000_000,
                    timeout_s=2.0, total_timeout_s=2.0, max_redirects=3)
PUBLIC_IP = "93.184.216.34"
TENANT, MERCHANT = "t1", "m1"


# --- local servers --------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    """Routes that behave well, redirect, or lie in one specific way each."""

    server: Any

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.seen_hosts.append(self.headers.get("Host"))
        path = self.path.split("?", 1)[0]
        if path.startswith("/loop/"):
            return self._redirect(f"/loop/{int(path.rsplit('/', 1)[1]) + 1}")
        route = getattr(self, "route_" + path.strip("/").replace("-", "_").replace(".", "_"), None)
        if route is None:
            return self._send(404, "text/plain", b"no such image")
        route()

    def _send(self, status: int, content_type: str, body: bytes, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", headers.pop("length", str(len(body))))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def route_photo_jpg(self) -> None:
        self._send(200, "image/jpeg", self.server.jpeg)

    def route_redirect(self) -> None:
        self._redirect("/photo.jpg")

    def route_redirect_gopher(self) -> None:
        self._redirect("gopher://127.0.0.1:70/_GET")

    def route_redirect_file(self) -> None:
        self._redirect("file:///etc/passwd")

    def route_redirect_creds(self) -> None:
        self._redirect(f"http://admin:s3cr3t@127.0.0.1:{self.server.server_port}/photo.jpg")

    def route_page_html(self) -> None:
        self._send(200, "text/html; charset=utf-8", b"<html><body>not an image</body></html>")

    def route_logo_svg(self) -> None:
        self._send(200, "image/svg+xml", b"<svg xmlns='http://www.w3.org/2000/svg'/>")

    def route_gzip(self) -> None:
        self._send(200, "image/jpeg", b"\x1f\x8b" + b"\x00" * 30, Content_Encoding="gzip")

    def route_lying(self) -> None:
        self._send(200, "image/jpeg", self.server.jpeg[:100], length="5000")

    def route_huge_declared(self) -> None:
        self._send(200, "image/jpeg", b"", length=str(10**9))

    def route_missing(self) -> None:
        self._send(404, "text/plain", b"gone")

    def route_broken(self) -> None:
        self._send(500, "text/plain", b"oops")

    def route_busy(self) -> None:
        self._send(429, "text/plain", b"slow down")

    def route_endless(self) -> None:
        self._stream({"Content-Type": "image/jpeg"}, lambda chunk: chunk)

    def route_endless_chunked(self) -> None:
        headers = {"Content-Type": "image/jpeg", "Transfer-Encoding": "chunked"}
        self._stream(headers, lambda chunk: b"%x\r\n%s\r\n" % (len(chunk), chunk))

    def _stream(self, headers: dict[str, str], frame: Callable[[bytes], bytes]) -> None:
        self.send_response(200)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        chunk = b"\xff" * 65536
        for _ in range(400):  # bounded even if the client never hangs up: 26 MB
            try:
                self.wfile.write(frame(chunk))
            except OSError:
                return

    def route_drip(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", "100000")
        self.end_headers()
        self._drip(b"\xff" * 200)

    def route_drip_headers(self) -> None:
        self.wfile.write(b"HTTP/1.0 200 OK\r\n")
        self._drip(b"X-Padding: " + b"a" * 200)

    def route_stall(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", "1000")
        self.end_headers()
        time.sleep(3)

    def _drip(self, data: bytes) -> None:
        for i in range(len(data)):  # one byte every 20 ms: each read is quick, the whole is not
            try:
                self.wfile.write(data[i : i + 1])
            except OSError:
                return
            time.sleep(0.02)


def _serve(server: ThreadingHTTPServer, jpeg: bytes) -> Iterator[ThreadingHTTPServer]:
    server.daemon_threads = True
    server.jpeg = jpeg  # type: ignore[attr-defined]
    server.seen_hosts = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def jpeg(dataset_dir: Path) -> bytes:
    return sorted((dataset_dir / "validation" / "dress").glob("*.jpg"))[0].read_bytes()


@pytest.fixture(scope="module")
def http_server(jpeg: bytes) -> Iterator[ThreadingHTTPServer]:
    yield from _serve(ThreadingHTTPServer(("127.0.0.1", 0), _Handler), jpeg)


@pytest.fixture()
def base(http_server: ThreadingHTTPServer) -> str:
    http_server.seen_hosts.clear()  # type: ignore[attr-defined]
    return f"http://127.0.0.1:{http_server.server_port}"


class CountingListener:
    """A TCP listener on 127.0.0.1 that only counts the connections it receives."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.count += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture()
def listener() -> Iterator[CountingListener]:
    counting = CountingListener()
    yield counting
    time.sleep(0.1)  # a connection in flight would be counted before the assertion in the test body
    counting.close()
    assert counting.count == 0, "a refused URL reached the listener"


@pytest.fixture()
def trap(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Replace outbound connects: a non-loopback address must never see a packet, even from a bug."""
    attempts: list[Any] = []

    def refuse(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
        attempts.append(address)
        raise ConnectionRefusedError("test trap: outbound connection attempted")

    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def resolver_for(mapping: dict[str, list[str]], calls: list[str] | None = None) -> Callable[..., list[Any]]:
    """A getaddrinfo stand-in; unknown names fail like NXDOMAIN rather than touching real DNS."""

    def resolve(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        if calls is not None:
            calls.append(host)
        if host not in mapping:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
            for ip in mapping[host]
        ]

    return resolve


def no_dns(host: str, *args: Any) -> list[Any]:
    raise AssertionError(f"resolver called for {host}: the URL should be refused before any lookup")


def fetch(fetcher: ImageFetcher, url: str) -> Any:
    return fetcher.fetch(url, tenant_id=TENANT, merchant_id=MERCHANT)


def assert_code(excinfo: pytest.ExceptionInfo[PipelineError], code: ErrorCode, *, retryable: bool) -> None:
    assert excinfo.value.code == code, excinfo.value.detail
    assert excinfo.value.retryable is retryable, excinfo.value.detail
    assert isinstance(excinfo.value, TransientError) is retryable


# --- happy paths ------------------------------------------------------------------------------------


def test_fetches_a_real_jpeg(base: str, jpeg: bytes) -> None:
    image = fetch(ImageFetcher(LOCAL), f"{base}/photo.jpg?v=2#frag")
    assert image.data == jpeg
    assert image.content_type == "image/jpeg"
    assert image.final_url == f"{base}/photo.jpg?v=2"


def test_follows_a_redirect_and_reports_the_final_url(base: str, jpeg: bytes) -> None:
    image = fetch(ImageFetcher(LOCAL), f"{base}/redirect")
    assert image.data == jpeg
    assert image.final_url == f"{base}/photo.jpg"


def test_connects_to_the_address_resolved_once_and_sends_the_hostname(
    http_server: ThreadingHTTPServer, jpeg: bytes
) -> None:
    calls: list[str] = []
    fetcher = ImageFetcher(LOCAL, resolver=resolver_for({"img.example.test": ["127.0.0.1"]}, calls))
    port = http_server.server_port
    http_server.seen_hosts.clear()  # type: ignore[attr-defined]
    assert fetch(fetcher, f"http://img.example.test:{port}/redirect").data == jpeg
    assert calls == ["img.example.test", "img.example.test"]  # once per hop, never at connect time
    assert http_server.seen_hosts == [f"img.example.test:{port}"] * 2  # type: ignore[attr-defined]


# --- HTTPS: pinned address, SNI and certificate checked against the hostname ------------------------------


@pytest.fixture(scope="module")
def tls_server(jpeg: bytes, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str, list[str]]]:
    cert_pem, key_pem, ca_pem = _issue_certificate("images.example.test")
    folder = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(cert_pem)
    (folder / "key.pem").write_bytes(key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    sni: list[str] = []
    def record_sni(_sock: Any, name: str | None, _ctx: Any) -> None:
        sni.append(name or "")

    context.sni_callback = record_sni
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    for running in _serve(server, jpeg):
        yield running, ca_pem.decode(), sni


def _issue_certificate(hostname: str) -> tuple[bytes, bytes, bytes]:
    """A throwaway CA and a leaf for ``hostname``, so verification runs for real without the internet."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "catalog-enrich test CA")])

    def builder(subject: x509.Name, key: Any) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(hours=1)))

    ca_cert = (builder(ca_name, ca_key)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, key_cert_sign=True, crl_sign=True,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))
    leaf_cert = (builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]), leaf_key)
                 .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
                 .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                 .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                critical=False)
                 .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    key_pem = leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return leaf_cert.public_bytes(pem), key_pem, ca_cert.public_bytes(pem)


def test_https_pins_the_vetted_address_with_sni_host_and_certificate(tls_server: Any, jpeg: bytes) -> None:
    server, ca_pem, sni = tls_server
    calls: list[str] = []
    fetcher = ImageFetcher(
        FetchPolicy(allow_private_addresses=True, timeout_s=2.0, total_timeout_s=3.0),
        resolver=resolver_for({"images.example.test": ["127.0.0.1"]}, calls),
        tls_context=ssl.create_default_context(cadata=ca_pem),
    )
    port = server.server_port
    server.seen_hosts.clear()
    sni.clear()
    image = fetch(fetcher, f"https://images.example.test:{port}/photo.jpg")
    assert image.data == jpeg and image.final_url == f"https://images.example.test:{port}/photo.jpg"
    assert calls == ["images.example.test"]
    assert sni == ["images.example.test"]
    assert server.seen_hosts == [f"images.example.test:{port}"]


def test_https_refuses_a_certificate_for_another_name(tls_server: Any) -> None:
    server, ca_pem, _ = tls_server
    fetcher = ImageFetcher(
        FetchPolicy(allow_private_addresses=True, timeout_s=2.0, total_timeout_s=3.0),
        resolver=resolver_for({"evil.example.test": ["127.0.0.1"]}),
        tls_context=ssl.create_default_context(cadata=ca_pem),
    )
    with pytest.raises(PipelineError) as excinfo:
        fetch(fetcher, f"https://evil.example.test:{server.server_port}/photo.jpg")
    assert_code(excinfo, ErrorCode.image_fetch_failed, retryable=False)
    assert "certificate" in excinfo.value.detail


# --- responses that lie or misbehave --------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "code", "retryable", "detail"),
    [
        ("/page.html", ErrorCode.image_rejected, False, "text/html"),
        ("/logo.svg", ErrorCode.image_rejected, False, "image/svg+xml"),
        ("/gzip", ErrorCode.image_rejected, False, "compressed"),
        ("/huge-declared", ErrorCode.image_rejected, False, "larger than"),
        ("/endless", ErrorCode.image_rejected, False, "exceeds"),
        ("/endless-chunked", ErrorCode.image_rejected, False, "exceeds"),
        ("/lying", ErrorCode.image_fetch_failed, True, "100 of 5000"),
        ("/missing", ErrorCode.image_fetch_failed, False, "HTTP 404"),
        ("/broken", ErrorCode.image_fetch_failed, True, "HTTP 500"),
        ("/busy", ErrorCode.image_fetch_failed, True, "HTTP 429"),
        ("/loop/0", ErrorCode.image_fetch_failed, False, "more than 3 redirects"),
        ("/redirect-gopher", ErrorCode.url_not_allowed, False, "gopher"),
        ("/redirect-file", ErrorCode.url_not_allowed, False, "file"),
        ("/redirect-creds", ErrorCode.url_not_allowed, False, "credentials"),
    ],
)
def test_bad_responses_get_their_code(
    base: str, path: str, code: ErrorCode, retryable: bool, detail: str
) -> None:
    with pytest.raises(PipelineError) as excinfo:
        fetch(ImageFetcher(LOCAL), base + path)
    assert_code(excinfo, code, retryable=retryable)
    assert detail in excinfo.value.detail
    assert "s3cr3t" not in str(excinfo.value)


def test_redirect_chain_stops_at_the_limit(base: str, http_server: ThreadingHTTPServer) -> None:
    with pytest.raises(PipelineError):
        fetch(ImageFetcher(LOCAL), f"{base}/loop/0")
    assert len(http_server.seen_hosts) == LOCAL.max_redirects + 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("path", ["/drip", "/drip-headers"])
def test_slow_drip_is_cut_at_the_total_deadline(base: str, path: str) -> None:
    policy = FetchPolicy(allow_http=True, allow_private_addresses=True, timeout_s=2.0, total_timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(PipelineError) as excinfo:
        fetch(ImageFetcher(policy), base + path)
    assert time.monotonic() - started < 2.0
    assert_code(excinfo, ErrorCode.image_fetch_failed, retryable=False)
    assert "total time limit" in excinfo.value.detail


def test_a_stalled_server_times_out_as_transient(base: str) -> None:
    policy = FetchPolicy(allow_http=True, allow_private_addresses=True, timeout_s=0.3, total_timeout_s=2.0)
    with pytest.raises(TransientError) as excinfo:
        fetch(ImageFetcher(policy), f"{base}/stall")
    assert "timed out" in excinfo.value.detail


def test_a_closed_port_is_transient() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    with pytest.raises(TransientError) as excinfo:
        fetch(ImageFetcher(LOCAL), f"http://127.0.0.1:{port}/photo.jpg")
    assert excinfo.value.code == ErrorCode.image_fetch_failed


# --- URLs aimed inside: refused before any connection ---------------------------------------------------


LOOPBACK_FORMS = [
    "https://127.0.0.1:{port}/a.jpg",
    "https://localhost:{port}/a.jpg",
    "https://LOCALHOST.:{port}/a.jpg",
    "https://img.localhost:{port}/a.jpg",
    "https://2130706433:{port}/a.jpg",
    "https://0177.0.0.1:{port}/a.jpg",
    "https://0x7f.0.0.1:{port}/a.jpg",
    "https://0x7f000001:{port}/a.jpg",
    "https://127.1:{port}/a.jpg",
    "https://127.000.000.001:{port}/a.jpg",
    "https://[::1]:{port}/a.jpg",
    "https://[::ffff:127.0.0.1]:{port}/a.jpg",
    "https://[::ffff:7f00:1]:{port}/a.jpg",
    "https://user:pw@127.0.0.1:{port}/a.jpg",
    "https://cdn.example.com@127.0.0.1:{port}/a.jpg",
    "http://127.0.0.1:{port}/a.jpg",
    "gopher://127.0.0.1:{port}/_GET",
    "ftp://127.0.0.1:{port}/a.jpg",
    "dict://127.0.0.1:{port}/",
    "file://127.0.0.1:{port}/etc/passwd",
    "https:/127.0.0.1:{port}/a.jpg",
    "https:127.0.0.1:{port}/a.jpg",
    "https://127.0.0.1:{port}\\@cdn.example.com/a.jpg",
    "https://127.0.0.1:{port}/a b.jpg",
    "https://127.0.0.1:{port}/\ta.jpg",
    "//127.0.0.1:{port}/a.jpg",
]


@pytest.mark.parametrize("form", LOOPBACK_FORMS)
def test_loopback_forms_are_refused_without_connecting(form: str, listener: CountingListener) -> None:
    fetcher = ImageFetcher(FetchPolicy(), resolver=no_dns)
    with pytest.raises(PipelineError) as excinfo:
        fetch(fetcher, form.format(port=listener.port))
    assert_code(excinfo, ErrorCode.url_not_allowed, retryable=False)
    assert "pw" not in excinfo.value.detail


@pytest.mark.parametrize("answers", [["127.0.0.1"], [PUBLIC_IP, "127.0.0.1"], ["::1"], ["::ffff:127.0.0.1"]])
def test_public_looking_name_with_private_dns_answer_is_refused(
    answers: list[str], listener: CountingListener
) -> None:
    calls: list[str] = []
    fetcher = ImageFetcher(FetchPolicy(), resolver=resolver_for({"cdn.example.com": answers}, calls))
    with pytest.raises(PipelineError) as excinfo:
        fetch(fetcher, f"https://cdn.example.com:{listener.port}/a.jpg")
    assert_code(excinfo, ErrorCode.url_not_allowed, retryable=False)
    assert calls == ["cdn.example.com"]


INSIDE_FORMS = [
    "https://10.0.0.1/a.jpg",
    "https://172.16.5.4/a.jpg",
    "https://192.168.1.1/a.jpg",
    "https://100.64.0.1/a.jpg",
    "https://169.254.169.254/latest/meta-data/",
    "https://0.0.0.0/a.jpg",
    "https://0/a.jpg",
    "https://224.0.0.1/a.jpg",
    "https://255.255.255.255/a.jpg",
    "https://240.0.0.1/a.jpg",
    "https://198.18.0.1/a.jpg",
    "https://192.0.0.170/a.jpg",
    "https://2852039166/latest/meta-data/",
    "https://0251.0376.0251.0376/latest/meta-data/",
    "https://0xa9fea9fe/latest/meta-data/",
    "https://[fd00::1]/a.jpg",
    "https://[fe80::1]/a.jpg",
    "https://[fe80::1%25eth0]/a.jpg",
    "https://[fec0::1]/a.jpg",
    "https://[::]/a.jpg",
    "https://[ff02::1]/a.jpg",
    "https://[::ffff:10.0.0.1]/a.jpg",
    "https://[::ffff:169.254.169.254]/latest/meta-data/",
    "https://[::ffff:a9fe:a9fe]/latest/meta-data/",
    "https://[2002:a9fe:a9fe::1]/a.jpg",
    "https://[2002:7f00:1::1]/a.jpg",
    "https://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/a.jpg",
    "https://[64:ff9b::a9fe:a9fe]/latest/meta-data/",
    "https://[::a9fe:a9fe]/a.jpg",
    "https://metadata.google.internal/computeMetadata/v1/",
    "https://printer.local/a.jpg",
    "https://user:s3cr3t@cdn.example.com/a.jpg",
    "http://cdn.example.com/a.jpg",
    "data:image/png;base64,iVBORw0KGgo=",
    "javascript:alert(1)",
    "file:///etc/passwd",
    "ldap://cdn.example.com/",
    "s3cr3t",
    "",
]


@pytest.mark.parametrize("url", INSIDE_FORMS)
def test_inside_addresses_and_schemes_are_refused_without_any_connect(url: str, trap: list[Any]) -> None:
    fetcher = ImageFetcher(FetchPolicy(), resolver=resolver_for({"cdn.example.com": [PUBLIC_IP]}))
    with pytest.raises(PipelineError) as excinfo:
        fetch(fetcher, url)
    assert_code(excinfo, ErrorCode.url_not_allowed, retryable=False)
    assert "s3cr3t" not in str(excinfo.value)
    assert trap == []


@pytest.mark.parametrize("answer", ["10.1.2.3", "169.254.169.254", "100.100.100.200", "fd00::5", "fe80::1%2"])
def test_name_resolving_inside_is_refused_without_any_connect(answer: str, trap: list[Any]) -> None:
    fetcher = ImageFetcher(FetchPolicy(), resolver=resolver_for({"images.example.com": [answer]}))
    with pytest.raises(PipelineError) as excinfo:
        fetch(fetcher, "https://images.example.com/a.jpg")
    assert_code(excinfo, ErrorCode.url_not_allowed, retryable=False)
    assert trap == []


def test_the_trap_really_catches_outbound_connects(trap: list[Any]) -> None:
    """Guards the guard: with private addresses allowed, the fetcher does try and the trap sees it."""
    with pytest.raises(TransientError):
        fetch(ImageFetcher(FetchPolicy(allow_private_addresses=True)), "https://10.255.255.1/a.jpg")
    assert trap == [("10.255.255.1", 443)]


def test_the_listener_really_counts_connections() -> None:
    """Guards the guard: a fetch the policy allows does reach the counting listener."""
    counting = CountingListener()
    try:
        with pytest.raises(TransientError):  # the listener hangs up without answering
            fetch(ImageFetcher(LOCAL), f"http://127.0.0.1:{counting.port}/a.jpg")
        time.sleep(0.1)
        assert counting.count == 1
    finally:
        counting.close()


def test_redirects_from_a_public_host_are_vetted_again() -> None:
    """The first hop would be public; every Location it could send is vetted like a new URL."""
    resolve = resolver_for({"cdn.example.com": [PUBLIC_IP], "rebind.example.com": ["10.0.0.7"]})
    fetcher = ImageFetcher(FetchPolicy(allow_http=True), resolver=resolve)
    first = fetcher.vet_web_url("https://cdn.example.com/a.jpg?sig=1")
    assert (first.host, first.port, first.address, first.request_target) == (
        "cdn.example.com", 443, PUBLIC_IP, "/a.jpg?sig=1")
    assert fetcher.vet_redirect(first, "/b.jpg").url == "https://cdn.example.com/b.jpg"
    for location in [
        "http://127.0.0.1/a.jpg",
        "https://169.254.169.254/latest/meta-data/",
        "//localhost/a.jpg",
        "https://rebind.example.com/a.jpg",
        "https://[::ffff:10.0.0.1]/",
        "http://2130706433/",
        "file:///etc/passwd",
        "gopher://cdn.example.com/",
        "https://u:p@cdn.example.com/",
    ]:
        with pytest.raises(PipelineError) as excinfo:
            fetcher.vet_redirect(first, location)
        assert excinfo.value.code == ErrorCode.url_not_allowed, location


def test_https_to_http_downgrade_is_refused_by_default() -> None:
    fetcher = ImageFetcher(FetchPolicy(), resolver=resolver_for({"cdn.example.com": [PUBLIC_IP]}))
    first = fetcher.vet_web_url("https://cdn.example.com/a.jpg")
    with pytest.raises(PipelineError) as excinfo:
        fetcher.vet_redirect(first, "http://cdn.example.com/a.jpg")
    assert excinfo.value.code == ErrorCode.url_not_allowed


def test_unresolvable_host_is_permanent_and_dns_outage_transient() -> None:
    with pytest.raises(PipelineError) as excinfo:
        ImageFetcher(FetchPolicy(), resolver=resolver_for({})).vet_web_url("https://nowhere.example.com/")
    assert_code(excinfo, ErrorCode.image_fetch_failed, retryable=False)

    def outage(*args: Any) -> list[Any]:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    with pytest.raises(TransientError):
        ImageFetcher(FetchPolicy(), resolver=outage).vet_web_url("https://cdn.example.com/")


@pytest.mark.parametrize(
    ("address", "public"),
    [
        (PUBLIC_IP, True), ("8.8.8.8", True), ("2606:4700::1111", True), ("::ffff:8.8.8.8", True),
        ("64:ff9b::808:808", True), ("2002:808:808::1", True),
        ("127.0.0.1", False), ("10.0.0.1", False), ("100.64.0.1", False), ("169.254.169.254", False),
        ("224.0.0.1", False), ("0.0.0.0", False), ("192.88.99.1", False), ("::1", False),
        ("fc00::1", False), ("fe80::1", False), ("fec0::1", False), ("ff0e::1", False),
        ("::ffff:127.0.0.1", False), ("2002:a00:1::", False), ("64:ff9b::a00:1", False),
        ("64:ff9b:1::808:808", False), ("2001:db8::1", False),
    ],
)
def test_address_classification(address: str, public: bool) -> None:
    import ipaddress

    assert is_public_address(ipaddress.ip_address(address)) is public


# --- file:// ----------------------------------------------------------------------------------------


def test_file_urls_inside_roots_only(dataset_dir: Path, jpeg: bytes, tmp_path: Path) -> None:
    photo = sorted((dataset_dir / "validation" / "dress").glob("*.jpg"))[0]
    fetcher = ImageFetcher(FetchPolicy(allow_file_urls=True, file_roots=(str(dataset_dir),)))
    assert fetch(fetcher, photo.as_uri()).data == jpeg
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(b"secret")
    escapes = [
        outside.as_uri(), f"file://{dataset_dir}/..%2F..%2Fetc%2Fpasswd", "file://otherhost/etc/passwd"]
    for url in escapes:
        with pytest.raises(PipelineError) as excinfo:
            fetch(fetcher, url)
        assert excinfo.value.code == ErrorCode.url_not_allowed, url
    rooted = ImageFetcher(FetchPolicy(allow_file_urls=True, file_roots=(str(tmp_path / "root"),)))
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "escape.jpg").symlink_to(outside)
    with pytest.raises(PipelineError) as excinfo:
        fetch(rooted, (tmp_path / "root" / "escape.jpg").as_uri())
    assert excinfo.value.code == ErrorCode.url_not_allowed


def test_file_errors_are_permanent(tmp_path: Path) -> None:
    fetcher = ImageFetcher(FetchPolicy(allow_file_urls=True, max_bytes=10))
    big = tmp_path / "big.jpg"
    big.write_bytes(b"x" * 11)
    cases = [
        ((tmp_path / "missing.jpg").as_uri(), ErrorCode.image_fetch_failed),
        (tmp_path.as_uri(), ErrorCode.image_fetch_failed),
        ("file:///dev/zero", ErrorCode.image_fetch_failed),
        (big.as_uri(), ErrorCode.image_rejected),
    ]
    for url, code in cases:
        with pytest.raises(PipelineError) as excinfo:
            fetch(fetcher, url)
        assert_code(excinfo, code, retryable=False)


# --- s3:// on a local moto server ------------------------------------------------------------------------

BUCKET, OTHER_BUCKET = "fetch-test-images", "fetch-test-other"


@pytest.fixture(scope="module")
def moto_endpoint(jpeg: bytes) -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = s3_client(endpoint)
    for bucket in (BUCKET, OTHER_BUCKET):
        client.create_bucket(Bucket=bucket)
    own_key = f"{TENANT}/{MERCHANT}/shirt.jpg"
    client.put_object(Bucket=BUCKET, Key=own_key, Body=jpeg, ContentType="image/jpeg")
    client.put_object(Bucket=BUCKET, Key=f"{TENANT}/m2/shirt.jpg", Body=jpeg)
    client.put_object(Bucket=OTHER_BUCKET, Key=f"{TENANT}/{MERCHANT}/shirt.jpg", Body=jpeg)
    yield endpoint
    server.stop()


def s3_client(endpoint: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
        aws_secret_access_key="test",
        config=Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1}),
    )


def s3_fetcher(endpoint: str, **policy: Any) -> ImageFetcher:
    policy_ = FetchPolicy(allowed_buckets=(BUCKET,), **policy)
    return ImageFetcher(policy_, s3_client_factory=lambda: s3_client(endpoint))


def test_s3_object_in_the_merchants_prefix(moto_endpoint: str, jpeg: bytes) -> None:
    image = fetch(s3_fetcher(moto_endpoint), f"s3://{BUCKET}/{TENANT}/{MERCHANT}/shirt.jpg")
    assert image.data == jpeg
    assert image.content_type == "image/jpeg"
    assert image.final_url == f"s3://{BUCKET}/{TENANT}/{MERCHANT}/shirt.jpg"


@pytest.mark.parametrize(
    "url",
    [
        f"s3://{OTHER_BUCKET}/{TENANT}/{MERCHANT}/shirt.jpg",
        f"s3://{BUCKET}/{TENANT}/m2/shirt.jpg",
        f"s3://{BUCKET}/t2/{MERCHANT}/shirt.jpg",
        f"s3://{BUCKET}/{TENANT}/{MERCHANT}x/shirt.jpg",
        f"s3://{BUCKET}/{TENANT}/{MERCHANT}/../m2/shirt.jpg",
        f"s3://{BUCKET}/{TENANT}/{MERCHANT}//shirt.jpg",
        f"s3://{BUCKET}/{TENANT}\\{MERCHANT}\\shirt.jpg",
        f"s3://{BUCKET}//{TENANT}/{MERCHANT}/shirt.jpg",
        f"s3://{BUCKET}/{TENANT}/{MERCHANT}/",
        f"s3://{BUCKET}",
        "s3://../etc/passwd",
    ],
)
def test_s3_refusals_happen_before_any_s3_call(url: str) -> None:
    def no_client() -> Any:
        raise AssertionError("an S3 client was built for a refused URL")

    fetcher = ImageFetcher(FetchPolicy(allowed_buckets=(BUCKET,)), s3_client_factory=no_client)
    with pytest.raises(PipelineError) as excinfo:
        fetch(fetcher, url)
    assert_code(excinfo, ErrorCode.url_not_allowed, retryable=False)


def test_s3_prefix_check_can_be_disabled(moto_endpoint: str, jpeg: bytes) -> None:
    fetcher = s3_fetcher(moto_endpoint, require_merchant_prefix=False)
    assert fetch(fetcher, f"s3://{BUCKET}/{TENANT}/m2/shirt.jpg").data == jpeg


def test_s3_tenant_ids_cannot_widen_the_prefix(moto_endpoint: str) -> None:
    with pytest.raises(PipelineError) as excinfo:
        url = f"s3://{BUCKET}/{TENANT}/m2/shirt.jpg"
        s3_fetcher(moto_endpoint).fetch(url, tenant_id=TENANT, merchant_id="..")
    assert excinfo.value.code == ErrorCode.url_not_allowed


def test_s3_missing_key_is_permanent(moto_endpoint: str) -> None:
    with pytest.raises(PipelineError) as excinfo:
        fetch(s3_fetcher(moto_endpoint), f"s3://{BUCKET}/{TENANT}/{MERCHANT}/nope.jpg")
    assert_code(excinfo, ErrorCode.image_fetch_failed, retryable=False)


def test_s3_object_over_the_cap_is_rejected(moto_endpoint: str) -> None:
    with pytest.raises(PipelineError) as excinfo:
        fetch(s3_fetcher(moto_endpoint, max_bytes=1000), f"s3://{BUCKET}/{TENANT}/{MERCHANT}/shirt.jpg")
    assert_code(excinfo, ErrorCode.image_rejected, retryable=False)


def test_s3_endpoint_down_is_transient() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    with pytest.raises(TransientError) as excinfo:
        fetch(s3_fetcher(f"http://127.0.0.1:{port}"), f"s3://{BUCKET}/{TENANT}/{MERCHANT}/shirt.jpg")
    assert excinfo.value.code == ErrorCode.image_fetch_failed


@pytest.mark.parametrize(
    ("status", "code", "transient"),
    [(500, "InternalError", True), (503, "SlowDown", True), (403, "AccessDenied", False)],
)
def test_s3_server_errors_are_classified(status: int, code: str, transient: bool) -> None:
    from botocore.exceptions import ClientError

    class FailingClient:
        def get_object(self, **kwargs: Any) -> Any:
            error = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
            raise ClientError(error, "GetObject")  # type: ignore[arg-type]

    fetcher = ImageFetcher(FetchPolicy(allowed_buckets=(BUCKET,)), s3_client_factory=FailingClient)
    with pytest.raises(PipelineError) as excinfo:
        fetch(fetcher, f"s3://{BUCKET}/{TENANT}/{MERCHANT}/shirt.jpg")
    assert_code(excinfo, ErrorCode.image_fetch_failed, retryable=transient)
