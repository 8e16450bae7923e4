"""Property: whatever a client sends, lbapp forwards it exactly or refuses it cleanly.

Random methods, header names and values, paths and bodies (hypothesis) go through a real lbapp to
a real echo backend: lbapp never answers 500 on its own (the echo never sends one on these
paths), the worker keeps serving, and the backend receives exactly the method, target, headers
and body bytes that were sent.
"""

from __future__ import annotations

import hashlib

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import ThreadedServer

TOKEN = st.text(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=12
)
# Headers lbapp owns or drops by rule (hop-by-hop, forwarding, framing): not compared.
OWNED = {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "host", "expect",
         "content-length", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-real-ip",
         "forwarded", "x-request-id", "proxy-connection", "proxy-authenticate", "proxy-authorization",
         "cookie", "idempotency-key"}  # fmt: skip
NAMES = TOKEN.map(str.lower).filter(lambda n: n not in OWNED and n != "proxy" and not n.startswith("proxy-"))
# A field value: visible ASCII and inner spaces (RFC 9110 §5.5), no leading or trailing whitespace.
VALUES = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40).flatmap(
    lambda v: st.just(v) if len(v) < 2 else st.sampled_from([v, v[:1] + " " + v[1:]])
)
# Dot segments are left out: httpx (the test's client) removes them before sending.
SEGMENT = st.text("abcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@", max_size=8).filter(
    lambda s: s not in (".", "..")
) | st.sampled_from(["%2F", "%20", "%41", "%25"])
PATHS = st.lists(SEGMENT, max_size=5).map(lambda segments: "/p/" + "/".join(segments))
# The methods the server's parser (llhttp) knows; it answers 400 to any other token by itself.
METHODS = st.sampled_from(
    ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND", "PROPPATCH", "MKCOL", "COPY",
     "MOVE", "LOCK", "UNLOCK", "REPORT", "SEARCH", "PURGE", "LINK", "UNLINK", "QUERY"]
)  # fmt: skip


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=METHODS,
    path=PATHS,
    headers=st.lists(st.tuples(NAMES, VALUES), max_size=8, unique_by=lambda h: h[0]),
    body=st.binary(max_size=3000) | st.binary(min_size=70_000, max_size=70_100),
)
def test_random_requests_are_forwarded_exactly_or_refused_cleanly(
    lb: ThreadedServer, method: str, path: str, headers: list[tuple[str, str]], body: bytes
) -> None:
    response = httpx.request(method, lb.url + path, headers=headers, content=body, timeout=30)
    assert response.status_code != 500, response.text
    assert response.status_code == 200, response.text  # every generated request is a valid one
    seen = response.json()
    assert (seen["method"], seen["raw_path"]) == (method, path)
    assert seen["body_bytes"] == len(body)
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
    got = [(name, value) for name, value in seen["header_list"] if name in dict(headers)]
    assert got == headers  # same names, values and order


def test_the_worker_survived(lb: ThreadedServer) -> None:
    assert httpx.get(lb.url + "/lb-health").status_code == 200
    assert lb.server.started and not lb.server.should_exit
