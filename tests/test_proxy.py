"""End to end: real echo backends, a real lbapp, real HTTP; bytes must pass unchanged."""

from __future__ import annotations

import gzip
import json
from typing import Any

import httpx

from .conftest import EchoBackend, ThreadedServer, mark_down, raw_request, run_lb


def echo(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_round_robin_alternates_over_three_backends(lb: ThreadedServer) -> None:
    with httpx.Client(base_url=lb.url) as client:
        servers = [echo(client.get("/"))["server"] for _ in range(9)]
    first = servers.index("backend-1")
    cycle = servers[first : first + 3]
    assert cycle == ["backend-1", "backend-2", "backend-3"]
    assert servers == (servers[:3] * 3)


def test_every_method_is_forwarded(lb: ThreadedServer) -> None:
    with httpx.Client(base_url=lb.url) as client:
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
            assert echo(client.request(method, "/m"))["method"] == method


def test_raw_path_and_query_reach_the_backend_unchanged(lb: ThreadedServer) -> None:
    for target in ("/a%2Fb/c?x=%2F&y=a+b%20c", "/./dot/../seg", "//double//slash", "/%7Euser?q=%zz"):
        response = raw_request(
            lb.port, b"GET " + target.encode() + b" HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        )
        document = json.loads(response.split(b"\r\n\r\n", 1)[1])
        path, _, query = target.partition("?")
        assert document["raw_path"] == path
        assert document["query"] == query


def test_client_headers_are_sent_exactly_with_forwarding_headers_added(lb: ThreadedServer) -> None:
    request = (
        b"POST /exact HTTP/1.1\r\nHost: front.example:8443\r\nX-Custom: one\r\nX-Custom: two\r\n"
        b"Content-Type: text/plain\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    )
    response = raw_request(lb.port, request)
    document = json.loads(response.split(b"\r\n\r\n", 1)[1])
    # lbapp adds one header of its own besides the forwarding ones: the generated X-Request-ID.
    request_ids = [v for n, v in document["header_list"] if n == "x-request-id"]
    assert len(request_ids) == 1 and len(request_ids[0]) == 32
    assert [h for h in document["header_list"] if h[0] != "x-request-id"] == [
        ["host", "front.example:8443"],
        ["x-custom", "one"],
        ["x-custom", "two"],
        ["content-type", "text/plain"],
        ["content-length", "5"],
        ["x-forwarded-for", "127.0.0.1"],
        ["x-real-ip", "127.0.0.1"],
        ["x-forwarded-proto", "http"],
        ["x-forwarded-host", "front.example:8443"],
    ]
    assert document["body_bytes"] == 5


def test_hop_by_hop_request_headers_are_removed(lb: ThreadedServer) -> None:
    request = (
        b"GET /hop HTTP/1.1\r\nHost: h\r\nConnection: close, X-Secret-Hop\r\nKeep-Alive: timeout=5\r\n"
        b"X-Secret-Hop: 1\r\nTE: trailers\r\nUpgrade: websocket\r\nProxy-Authorization: Basic eA==\r\n"
        b"Proxy-Connection: keep-alive\r\nX-Kept: yes\r\n\r\n"
    )
    document = json.loads(raw_request(lb.port, request).split(b"\r\n\r\n", 1)[1])
    names = {name for name, _ in document["header_list"]}
    dropped = {
        "connection",
        "keep-alive",
        "x-secret-hop",
        "te",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
    }
    assert not names & dropped
    assert "x-kept" in names


def test_untrusted_forwarding_headers_are_replaced(lb: ThreadedServer) -> None:
    headers = {"X-Forwarded-For": "6.6.6.6", "X-Real-IP": "6.6.6.6", "X-Forwarded-Proto": "https"}
    document = echo(httpx.get(lb.url + "/xff", headers=headers))
    assert document["headers"]["x-forwarded-for"] == "127.0.0.1"
    assert document["headers"]["x-real-ip"] == "127.0.0.1"
    assert document["headers"]["x-forwarded-proto"] == "http"


def test_trusted_proxy_chain_is_appended(echo_backends: list[EchoBackend]) -> None:
    with run_lb([echo_backends[0].url], trusted_proxies=["127.0.0.0/8"]) as server:
        headers = {"X-Forwarded-For": "203.0.113.7, 127.0.0.9", "X-Forwarded-Proto": "https"}
        document = echo(httpx.get(server.url + "/xff", headers=headers))
    assert document["headers"]["x-forwarded-for"] == "203.0.113.7, 127.0.0.9, 127.0.0.1"
    assert document["headers"]["x-real-ip"] == "203.0.113.7"
    assert document["headers"]["x-forwarded-proto"] == "https"


def test_host_is_rewritten_when_configured(echo_backends: list[EchoBackend]) -> None:
    backend = echo_backends[0]
    with run_lb([backend.url], preserve_host=False) as server:
        document = echo(httpx.get(server.url + "/host", headers={"Host": "front.example"}))
    assert document["headers"]["host"] == f"127.0.0.1:{backend.port}"
    assert document["headers"]["x-forwarded-host"] == "front.example"


def test_duplicate_response_headers_survive(lb: ThreadedServer) -> None:
    response = httpx.get(lb.url + "/cookies")
    assert response.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]


def test_compressed_bodies_pass_undecoded(lb: ThreadedServer) -> None:
    with httpx.Client() as client, client.stream("GET", lb.url + "/gzip") as response:
        raw = b"".join(response.iter_raw())
    assert response.headers["content-encoding"] == "gzip"
    assert int(response.headers["content-length"]) == len(raw)
    assert gzip.decompress(raw) == b"hello " * 100


def test_redirects_are_not_followed(lb: ThreadedServer) -> None:
    response = httpx.get(lb.url + "/redirect")
    assert response.status_code == 302
    assert response.headers["location"] == "/elsewhere"


def test_head_204_and_304_have_no_body(lb: ThreadedServer) -> None:
    head = raw_request(lb.port, b"HEAD /bytes/1000 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    status_line, _, rest = head.partition(b"\r\n")
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert status_line == b"HTTP/1.1 200 OK"
    assert b"content-length: 1000" in headers.lower()
    assert body == b""
    for status in (204, 304):
        response = raw_request(
            lb.port, b"GET /status/%d HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n" % status
        )
        head_part, _, body = response.partition(b"\r\n\r\n")
        assert head_part.startswith(b"HTTP/1.1 %d" % status)
        assert body == b""
        assert b"transfer-encoding" not in head_part.lower()


def test_cookies_never_leak_between_clients(lb: ThreadedServer) -> None:
    with httpx.Client(base_url=lb.url) as client_a:
        assert client_a.get("/cookies").headers.get_list("set-cookie")
    with httpx.Client(base_url=lb.url) as client_b:
        for _ in range(3):  # every backend, in case one connection carried a cookie
            assert "cookie" not in echo(client_b.get("/who"))["headers"]


def test_chunked_upload_is_streamed_to_the_backend(lb: ThreadedServer) -> None:
    def body() -> Any:
        for _ in range(10):
            yield b"x" * 10_000

    document = echo(httpx.post(lb.url + "/upload", content=body()))
    assert document["body_bytes"] == 100_000
    assert document["headers"]["transfer-encoding"] == "chunked"
    assert "content-length" not in document["headers"]


def test_no_healthy_backend_gives_503_json() -> None:
    with run_lb(["http://127.0.0.1:9"], max_retries=0) as server:
        pool = server.app.state.clusters.default.pool
        mark_down(pool, pool.backends[0])
        response = httpx.get(server.url + "/")
    assert response.status_code == 503
    assert response.json() == {"error": "all backends are down"}
    assert response.headers["content-type"] == "application/json"


def test_own_endpoints_are_not_proxied(lb: ThreadedServer) -> None:
    response = httpx.get(lb.url + "/metrics")
    assert response.status_code == 200
    assert b"lb_backend_up" in response.content
    document = httpx.get(lb.url + "/lb-metrics").json()
    assert document["total_backends"] == 3
    assert httpx.get(lb.url + "/lb-ready").json()["ready"] is True
