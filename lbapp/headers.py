"""Forwarding rules as data: what crosses the proxy in each direction, and what is added.

Modelled on Go's `net/http/httputil/reverseproxy.go` and RFC 9110 §7.6.1. Header lists are the
raw ASGI/httpx lists, so duplicates (several `Set-Cookie`) and order survive.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import lru_cache

from .answers import http_date

Headers = list[tuple[bytes, bytes]]

# Hop-by-hop headers: meaningful for one connection only, never forwarded (RFC 9110 §7.6.1).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Also never sent upstream: `Expect` is answered by the server in front of us (uvicorn sends
# `100 Continue` when the body is read), the forwarding headers are rebuilt below, and `Proxy`
# (httpoxy: CGI-style backends read it as HTTP_PROXY) and every `Proxy-*` header are dropped.
FORWARDING = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-real-ip", b"forwarded"}
)
REQUEST_DROP = HOP_BY_HOP | {b"expect"}
# 1xx/204/304 carry no body; uvicorn would wait for `Content-Length` bytes that never come.
NO_BODY_STATUS = frozenset({*range(100, 200), 204, 304})


# `Connection` values that name no other header: nothing more to drop (the common case).
PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"Keep-Alive", b"Close", b"upgrade"})


def connection_tokens(value: bytes) -> set[bytes]:
    if value in PLAIN_CONNECTION:
        return set()
    return {token.strip().lower() for token in value.split(b",") if token.strip()}


class RequestHead:
    """The parts of the client's header block the proxy needs, gathered in one pass."""

    __slots__ = ("chunked", "content_length", "forwarded_for", "headers", "host", "host_count")

    def __init__(self) -> None:
        self.headers: Headers = []
        self.host = b""
        self.host_count = 0
        self.content_length: int | None = None
        self.chunked = False
        self.forwarded_for = b""

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


def parse_request_headers(raw: Iterable[tuple[bytes, bytes]], trust_forwarded: bool) -> RequestHead:
    """Filter the client's headers for the backend; keep forwarding headers only from a trusted peer."""
    head = RequestHead()
    kept = head.headers
    extra_drop: set[bytes] | None = None
    for name, value in raw:
        if name in REQUEST_DROP:
            if name == b"connection":
                extra_drop = (extra_drop or set()) | connection_tokens(value)
            elif name == b"transfer-encoding":
                head.chunked = b"chunked" in value.lower()
            continue
        if name in FORWARDING:
            if trust_forwarded:
                if name == b"x-forwarded-for":
                    head.forwarded_for = (
                        value if not head.forwarded_for else head.forwarded_for + b", " + value
                    )
                    continue
                kept.append((name, value))
            continue
        if name == b"host":
            head.host = value
            head.host_count += 1
        elif name[:5] == b"proxy" and (len(name) == 5 or name[5] == 0x2D):  # Proxy (httpoxy), Proxy-*
            continue
        elif name == b"content-length":
            head.content_length = int(value) if value.isdigit() else -1
        kept.append((name, value))
    if extra_drop:
        # Headers named in `Connection` are hop-by-hop too; Host and framing stay ours to decide.
        extra_drop -= {b"host", b"content-length"}
    if head.chunked and head.content_length is not None:
        # Both framings: Transfer-Encoding wins and Content-Length must go (RFC 9112 §6.3), or the
        # backend may read the body differently than uvicorn did (request smuggling).
        extra_drop = (extra_drop or set()) | {b"content-length"}
        head.content_length = None
    if extra_drop:
        head.headers = [(n, v) for n, v in kept if n not in extra_drop]
    return head


def add_forwarding_headers(
    head: RequestHead, peer: str, client_ip: str, scheme: str, trust_forwarded: bool
) -> None:
    """Append the peer to X-Forwarded-For, set X-Real-IP, X-Forwarded-Proto and -Host.

    From an untrusted peer every incoming forwarding header was dropped (they are spoofable), as
    Traefik and Caddy do; from a trusted proxy its X-Forwarded-Proto/-Host are kept.
    """
    headers = head.headers
    peer_bytes = peer.encode("latin-1")
    xff = head.forwarded_for + b", " + peer_bytes if head.forwarded_for else peer_bytes
    headers.append((b"x-forwarded-for", xff))
    headers.append((b"x-real-ip", client_ip.encode("latin-1")))
    if not trust_forwarded or not any(n == b"x-forwarded-proto" for n, _ in headers):
        headers.append((b"x-forwarded-proto", scheme.encode("latin-1")))
    if head.host and (not trust_forwarded or not any(n == b"x-forwarded-host" for n, _ in headers)):
        headers.append((b"x-forwarded-host", head.host))


def filter_response_headers(raw: Iterable[tuple[bytes, bytes, bytes]], status: int) -> tuple[Headers, int]:
    """Drop hop-by-hop headers (and those named in `Connection`) from the backend's answer.

    `raw` holds (raw name, lower-case name, value) triples, as parsed; what is sent keeps the
    lower-case names. Returns the headers to send and the Content-Length (-1 if none). A
    response without `Date` gets one (RFC 9110 §6.6.1); the backend's own is kept. The backend's
    `X-Request-ID` is dropped: the proxy adds the request's.
    """
    out: Headers = []
    extra_drop: set[bytes] | None = None
    no_body = status in NO_BODY_STATUS
    length = -1
    dated = False
    for _, name, value in raw:
        if name in HOP_BY_HOP:
            if name == b"connection":
                extra_drop = (extra_drop or set()) | connection_tokens(value)
            continue
        if name == b"content-length":
            if no_body:
                continue
            length = int(value) if value.isdigit() else -1
        elif name == b"date":
            dated = True
        elif name == b"x-request-id":
            continue  # the proxy adds the request's own (observe.Tap): exactly one
        out.append((name, value))
    if extra_drop:
        extra_drop.discard(b"content-length")
        out = [(n, v) for n, v in out if n not in extra_drop]
    if not dated:
        out.append((b"date", http_date()))
    return out, length


class Networks:
    """A CIDR list and a cached membership test (IPv4-mapped IPv6 peers count as IPv4)."""

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks = tuple(ipaddress.ip_network(n, strict=False) for n in networks)
        self.contains = lru_cache(maxsize=4096)(self._contains)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def _contains(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.strip())
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks)


class TrustedProxies(Networks):
    """Which peers may tell us the real client address (X-Forwarded-For)."""

    def client_ip(self, peer: str, forwarded_for: bytes) -> str:
        """The rightmost address in the chain that is not a trusted proxy (nginx real_ip_recursive)."""
        if not forwarded_for:
            return peer
        for item in reversed(forwarded_for.decode("latin-1").split(",")):
            candidate = item.strip()
            if candidate and not self.contains(candidate):
                return candidate
        return peer
