"""rawheaders: the one helper relying on httpx.Headers' layout; these tests fail if httpx changes it."""

from __future__ import annotations

import httpx

from lbapp.rawheaders import adopt, triples
from lbapp.upstream import fast_headers, response_headers

PAIRS = [(b"Content-Type", b"text/plain"), (b"Set-Cookie", b"a=1"), (b"set-cookie", b"b=2"), (b"X-E", b"")]


def test_adopted_headers_equal_the_public_constructors_result() -> None:
    public = httpx.Headers(PAIRS)
    adopted = adopt(httpx.Headers(), [(name, name.lower(), value) for name, value in PAIRS])
    assert adopted.raw == public.raw == PAIRS
    assert adopted.multi_items() == public.multi_items()
    assert adopted.get_list("set-cookie") == ["a=1", "b=2"]
    assert adopted["content-type"] == "text/plain"
    assert adopted == public


def test_triples_read_raw_and_lower_case_names_in_order_with_duplicates() -> None:
    public = httpx.Headers(PAIRS)
    assert triples(public) == [(name, name.lower(), value) for name, value in PAIRS]


def test_requests_and_responses_built_through_the_helpers_behave_like_public_ones() -> None:
    raw = [(b"host", b"example.test"), (b"x-dup", b"1"), (b"x-dup", b"2")]
    request = httpx.Request("GET", "http://example.test/", headers=fast_headers(raw))
    assert request.headers.raw == raw
    assert request.headers.get_list("X-Dup") == ["1", "2"]
    response = httpx.Response(200, headers=[(b"Set-Cookie", b"a=1"), (b"X-A", b"b")])
    assert response_headers(response) == [(b"Set-Cookie", b"set-cookie", b"a=1"), (b"X-A", b"x-a", b"b")]
