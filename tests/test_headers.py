"""Forwarding rules (unit level): hop-by-hop headers, Connection-named headers, trust."""

from __future__ import annotations

from lbapp.headers import (
    TrustedProxies,
    add_forwarding_headers,
    filter_response_headers,
    parse_request_headers,
)


def test_request_hop_by_hop_and_connection_named_headers_are_dropped() -> None:
    raw = [
        (b"host", b"h"),
        (b"connection", b"keep-alive, x-hop"),
        (b"x-hop", b"1"),
        (b"keep-alive", b"timeout=5"),
        (b"transfer-encoding", b"chunked"),
        (b"expect", b"100-continue"),
        (b"accept", b"*/*"),
    ]
    head = parse_request_headers(raw, trust_forwarded=False)
    assert head.headers == [(b"host", b"h"), (b"accept", b"*/*")]
    assert head.chunked and head.has_body and head.host == b"h"


def test_connection_cannot_remove_host_or_content_length() -> None:
    raw = [(b"host", b"h"), (b"content-length", b"3"), (b"connection", b"host, content-length")]
    head = parse_request_headers(raw, trust_forwarded=False)
    assert head.headers == [(b"host", b"h"), (b"content-length", b"3")]
    assert head.content_length == 3


def test_response_hop_by_hop_headers_are_dropped_duplicates_kept() -> None:
    raw = [
        (b"set-cookie", b"a=1"),
        (b"connection", b"close, X-Private"),
        (b"x-private", b"p"),
        (b"transfer-encoding", b"chunked"),
        (b"set-cookie", b"b=2"),
        (b"content-length", b"10"),
    ]
    dated = [*raw, (b"date", b"Thu, 03 Dec 2026 10:00:00 GMT")]  # the backend's Date is kept
    parsed = [(name.title(), name, value) for name, value in dated]  # the parser's triples
    assert filter_response_headers(parsed, 200) == (
        [(b"set-cookie", b"a=1"), (b"set-cookie", b"b=2"), (b"content-length", b"10"), dated[-1]],
        10,
    )
    headers, length = filter_response_headers([(b"Content-Length", b"content-length", b"10")], 304)
    assert length == -1 and [name for name, _ in headers] == [b"date"]  # none: lbapp adds one


def test_untrusted_peer_loses_its_forwarding_headers() -> None:
    raw = [(b"x-forwarded-for", b"6.6.6.6"), (b"forwarded", b"for=6.6.6.6"), (b"x-real-ip", b"6.6.6.6")]
    head = parse_request_headers(raw, trust_forwarded=False)
    add_forwarding_headers(head, "192.0.2.1", "192.0.2.1", "https", trust_forwarded=False)
    assert head.headers == [
        (b"x-forwarded-for", b"192.0.2.1"),
        (b"x-real-ip", b"192.0.2.1"),
        (b"x-forwarded-proto", b"https"),
    ]


def test_trusted_chain_resolves_the_rightmost_untrusted_address() -> None:
    trusted = TrustedProxies(["10.0.0.0/8", "127.0.0.1"])
    assert trusted.contains("10.1.2.3") and not trusted.contains("8.8.8.8") and not trusted.contains("junk")
    assert trusted.client_ip("10.0.0.1", b"1.1.1.1, 2.2.2.2, 10.0.0.5") == "2.2.2.2"
    assert trusted.client_ip("10.0.0.1", b"10.0.0.7") == "10.0.0.1"
    head = parse_request_headers([(b"x-forwarded-for", b"1.1.1.1"), (b"x-forwarded-for", b"2.2.2.2")], True)
    assert head.forwarded_for == b"1.1.1.1, 2.2.2.2"


def test_transfer_encoding_overrides_content_length() -> None:
    raw = [(b"host", b"h"), (b"content-length", b"5"), (b"transfer-encoding", b"chunked")]
    head = parse_request_headers(raw, trust_forwarded=False)
    assert head.headers == [(b"host", b"h")]
    assert head.chunked and head.content_length is None and head.has_body


def test_networks_match_ipv4_mapped_ipv6_peers() -> None:
    from lbapp.headers import Networks

    networks = Networks(["127.0.0.0/8"])
    assert networks.contains("::ffff:127.0.0.1") and networks.contains("127.0.0.2")
    assert not networks.contains("::1") and not networks.contains("not an address")
    assert not Networks([])
