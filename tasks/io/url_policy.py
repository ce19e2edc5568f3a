"""Decide whether an image URL, host or address may be fetched, without touching the network.

Merchants write the image URLs we fetch, so every URL is hostile input and a server-side request
forgery (SSRF) vector: it may name the cloud metadata service, a loopback admin port, an internal
DNS name, a private range hidden inside an IPv6 form, or a host spelled so that two URL parsers
disagree about where it points. The rules here refuse all of those before any DNS lookup or
connection, and refuse ambiguous forms rather than guess. They are pure functions; the I/O (DNS,
sockets, S3, files) lives in ``tasks.io.fetcher``, which calls them at its one choke point per scheme
and again for every redirect.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any
from urllib.parse import urlsplit

from tasks.errors import ErrorCode, PipelineError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_URL_LENGTH = 4096

# Names that only mean something inside a network; refused before any DNS lookup.
_INTERNAL_NAMES = frozenset({"localhost"})
_INTERNAL_SUFFIXES = (".localhost", ".internal", ".local", ".localdomain", ".home.arpa")

# Ranges the stdlib flags miss or classify inconsistently across Python versions.
_EXTRA_BLOCKED = tuple(
    ipaddress.ip_network(n)
    for n in ("100.64.0.0/10", "192.0.0.0/24", "192.88.99.0/24", "64:ff9b:1::/48", "fec0::/10")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")

_DOTTED_QUAD = re.compile(r"^(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}$")
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|\d+)$")
_DNS_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9])?$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]{0,31}):")
S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def refused(detail: str) -> PipelineError:
    return PipelineError(ErrorCode.url_not_allowed, detail)


def is_public_address(address: IPAddress) -> bool:
    """True only for globally routable unicast addresses, looking inside IPv6 forms that embed IPv4."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return is_public_address(address.ipv4_mapped)
        if address in _NAT64:  # DNS64 answers for IPv4-only hosts: judge the IPv4 inside
            return is_public_address(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        if any(not is_public_address(v4) for v4 in _embedded_ipv4(address)):
            return False
    if any(address in net for net in _EXTRA_BLOCKED):
        return False
    flags = (
        address.is_private,
        address.is_loopback,
        address.is_link_local,
        address.is_multicast,
        address.is_reserved,
        address.is_unspecified,
    )
    return address.is_global and not any(flags)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses a 6to4, Teredo or IPv4-compatible address would deliver traffic to."""
    found: list[ipaddress.IPv4Address] = []
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.extend(address.teredo)
    if address in _IPV4_COMPATIBLE and int(address) > 1:
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


def scheme_of(url: str) -> str:
    if not isinstance(url, str) or len(url) > MAX_URL_LENGTH or has_control(url):
        raise refused("URL is malformed or too long")
    match = _SCHEME.match(url)
    if match is None:
        raise refused("URL is not absolute")
    return match.group(1).lower()


def split_web_url(url: str, *, allow_http: bool) -> Any:
    """Parse strictly: forms that parsers disagree on are refused rather than guessed."""
    if not url.isascii() or any(c.isspace() for c in url) or "\\" in url:
        raise refused("URL contains characters that must be percent-encoded")
    if has_control(url) or len(url) > MAX_URL_LENGTH:
        raise refused("URL is malformed or too long")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise refused("URL is malformed") from None
    if parts.scheme not in ("http", "https"):
        raise refused(f"URL scheme '{scheme_of(url)}' is not allowed")
    if parts.scheme == "http" and not allow_http:
        raise refused("plain http is not allowed")
    if "@" in parts.netloc:
        raise refused("credentials in URLs are not allowed")
    if not parts.netloc or not url.lower().startswith(f"{parts.scheme}://"):
        raise refused("URL has no host")
    return parts


def port_of(parts: Any) -> int:
    try:
        port = parts.port
    except ValueError:
        raise refused("URL port is invalid") from None
    if port == 0:
        raise refused("URL port is invalid")
    return port or (443 if parts.scheme == "https" else 80)


def normalise_host(host: str, *, allow_private: bool) -> str:
    """Lower-case, refuse internal names and every IPv4 spelling except the canonical dotted quad."""
    host = host.lower()
    host = host[:-1] if host.endswith(".") else host
    if not host or "%" in host:
        raise refused("URL host is invalid")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise refused("URL host is invalid") from None
        return host
    labels = host.split(".")
    if _NUMERIC_LABEL.match(labels[-1]):
        if not _DOTTED_QUAD.match(host):
            raise refused("numeric host in a non-canonical form is not allowed")
        return host
    if len(host) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise refused("URL host is not a valid DNS name")
    internal = host in _INTERNAL_NAMES or host.endswith(_INTERNAL_SUFFIXES)
    if internal and not allow_private:
        raise refused(f"host {host} is internal")
    return host


def ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def has_control(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def safe_segment(value: str) -> bool:
    if not value or value in (".", "..") or has_control(value):
        return False
    return "/" not in value and "\\" not in value
