"""The one place that relies on `httpx.Headers`' internal layout, for speed on the request path.

`httpx.Headers` stores a list of (raw name, lower-case name, value) byte triples. Its public
constructor re-checks and lower-cases every name, and its public views (`raw`, `multi_items()`)
drop the lower-case name or decode to str. For a proxy whose header names are already lower-case
(ASGI) or already split by the response parser, that is pure overhead: measured with timeit for a
typical 8-header request and response (build the request, build the response, read its
lower-case pairs), the public way took 11.4 µs against 6.7 µs with these two helpers: about 4.7 µs
more per proxied request, well above the 2 µs that would justify the public API.

httpx 0.28 is pinned and its last release; tests/test_rawheaders.py fails if the layout changes.
"""

from __future__ import annotations

import httpx

__all__ = ["adopt", "triples"]

Triple = tuple[bytes, bytes, bytes]


def adopt(headers: httpx.Headers, items: list[Triple]) -> httpx.Headers:
    """Make ``headers`` hold ``items``, (raw name, lower-case name, value) triples, as they are.

    The caller guarantees the lower-case names are the raw names lower-cased; nothing is copied.
    """
    headers._list = items
    return headers


def triples(headers: httpx.Headers) -> list[Triple]:
    """The headers as (raw name, lower-case name, value) triples, in order (not a copy)."""
    return headers._list
