"""The front door: what one client may cost, and what lbapp refuses to forward (end to end).

Real servers throughout: echo backends, a third-party server without `/health` (Python's own
`http.server`), raw sockets for clients that trickle or lie, and a raw backend that sends no
`Date`.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .conftest import ROOT, EchoBackend, listening_socket, raw_request, run_lb, wait_until


def head_of(answer: bytes) -> tuple[int, list[tuple[bytes, bytes]]]:
    lines = answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = [(k.strip().lower(), v.strip()) for k, _, v in (line.partition(b":") for line in lines[1:])]
    return status, headers


@contextlib.contextmanager
def http_server() -> Iterator[str]:
    """`python -m http.server`: an app with no /health at all (404), as most apps are."""
    sock = listening_socket()
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", ROOT],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _up(url), timeout=15)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/README.md", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_an_app_without_health_stays_up_with_default_settings() -> None:
    with http_server() as app, run_lb([app], health_interval=0.1) as server:
        backend = server.app.state.clusters.default.pool.backends[0]
        wait_until(lambda: backend.checks_passed >= 3, timeout=10)  # three intervals of TCP checks
        assert backend.checks_failed == 0 and backend.state == "healthy"
        assert httpx.get(server.url + "/health").status_code == 404  # the app's own answer, passed on
        assert httpx.get(server.url + "/README.md").status_code == 200


@contextlib.contextmanager
def raw_backend(answer: bytes) -> Iterator[str]:
    """A backend that reads a request head and answers `answer` on every connection."""
    sock = listening_socket()
    stop = threading.Event()

    def serve() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        sock.close()


def test_exactly_one_date_on_proxied_and_own_answers(echo_backends: list[EchoBackend]) -> None:
    undated = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    with raw_backend(undated) as plain, run_lb([plain]) as server, httpx.Client() as client:
        added = client.get(server.url + "/x")
        assert added.status_code == 200 and len(added.headers.get_list("date")) == 1
        own = client.get(server.url + "/lb-metrics")
        assert len(own.headers.get_list("date")) == 1
    with run_lb([echo_backends[0].url, "http://127.0.0.1:9"], max_retries=0) as server:
        answers = [httpx.get(server.url + "/x") for _ in range(2)]  # the echo's and a 502
        assert sorted(a.status_code for a in answers) == [200, 502]
        assert all(len(a.headers.get_list("date")) == 1 for a in answers)


def test_a_stalled_small_body_gets_408_and_never_reaches_a_backend(echo_backends: list[EchoBackend]) -> None:
    with run_lb([echo_backends[0].url], client_body_timeout=1) as server:
        backend = server.app.state.clusters.default.pool.backends[0]
        started = time.monotonic()
        answer = raw_request(server.port, b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nabc")
        assert time.monotonic() - started < 1 + 1  # the timeout + 1 s
        assert head_of(answer)[0] == 408
        assert backend.total_requests == 0  # buffered: no backend was ever chosen


def test_a_stalled_large_body_is_abandoned_upstream(echo_factory: Any) -> None:
    echo: EchoBackend = echo_factory("echo")
    with run_lb([echo.url], client_body_timeout=1, request_buffer=1024) as server:
        backend = server.app.state.clusters.default.pool.backends[0]
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n" + b"x" * 5000)
            wait_until(lambda: backend.in_flight == 1)  # past the buffer: streaming to the backend
            answer = sock.recv(65536)
        assert head_of(answer)[0] == 408
        wait_until(lambda: backend.in_flight == 0)  # the upstream request was abandoned
        assert backend.total_failures == 0  # the client's fault, not the backend's


def test_many_stalled_uploads_hold_no_backend_connection(echo_backends: list[EchoBackend]) -> None:
    with run_lb([echo_backends[0].url], client_body_timeout=30) as server:
        backend = server.app.state.clusters.default.pool.backends[0]
        socks = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(50)]
        try:
            for sock in socks:
                sock.sendall(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\nab")
            wait_until(lambda: server.app.state.stats.in_flight == 50)
            assert backend.in_flight == 0 and backend.total_requests == 0
            assert httpx.get(server.url + "/x").status_code == 200  # others are still served
        finally:
            for sock in socks:
                sock.close()


def test_body_size_limit_both_framings(echo_factory: Any, tmp_path: Any) -> None:
    echo: EchoBackend = echo_factory("echo", "--id-log", str(tmp_path / "ids.log"))
    with run_lb([echo.url], max_body_size=1000, request_buffer=100) as server:
        declared = httpx.post(server.url + "/x", content=b"x" * 1001)
        assert declared.status_code == 413 and declared.json() == {"error": "request body too large"}

        def chunks() -> Iterator[bytes]:
            for _ in range(30):
                yield b"y" * 100

        chunked = httpx.post(server.url + "/x", content=chunks())
        assert chunked.status_code == 413
        fits = httpx.post(server.url + "/x", content=b"z" * 1000)
        assert fits.status_code == 200 and fits.json()["body_bytes"] == 1000
    # The backend finished only the request that fitted (the chunked one was cut off mid-body).
    finished = [line for line in (tmp_path / "ids.log").read_text().splitlines() if line.startswith("POST")]
    assert len(finished) == 1


def test_in_flight_cap_answers_503_with_retry_after(echo_backends: list[EchoBackend]) -> None:
    with run_lb([echo_backends[0].url], max_in_flight=2) as server, httpx.Client(timeout=30) as client:
        stats = server.app.state.stats
        slow = [threading.Thread(target=client.get, args=(server.url + "/sleep/2",)) for _ in range(2)]
        for thread in slow:
            thread.start()
        wait_until(lambda: stats.in_flight == 2)
        refused = client.get(server.url + "/x")
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        for thread in slow:
            thread.join(timeout=30)
        assert client.get(server.url + "/x").status_code == 200


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),  # duplicate Host
        (b"GET /x HTTP/1.1\r\n\r\n", 400),  # missing Host on HTTP/1.1
        (b"GET /x HTTP/1.1\r\nHost: a b\r\n\r\n", 400),  # not host[:port]
        (b"GET /x HTTP/1.1\r\nHost: a:80:80\r\n\r\n", 400),
        (b"GET /x HTTP/1.0\r\n\r\n", 200),  # HTTP/1.0 needs no Host
        (b"GET /x HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n", 200),
        (b"TRACE /x HTTP/1.1\r\nHost: a\r\n\r\n", 405),
        (b"GET /../x HTTP/1.1\r\nHost: a\r\n\r\n", 400),  # climbs above the root
        (b"GET /a/%2e%2e/%2e%2e/x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ],
)
def test_request_hygiene(echo_backends: list[EchoBackend], request_bytes: bytes, status: int) -> None:
    with run_lb([echo_backends[0].url]) as server:
        request = request_bytes.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
        got, headers = head_of(raw_request(server.port, request))
    assert got == status
    if status == 405:
        assert (b"allow", b"GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS") in headers


def test_trace_allowed_when_configured(echo_backends: list[EchoBackend]) -> None:
    with run_lb([echo_backends[0].url], allow_trace=True) as server:
        assert httpx.request("TRACE", server.url + "/x").status_code == 200


def test_proxy_headers_never_reach_the_backend(echo_backends: list[EchoBackend]) -> None:
    with run_lb([echo_backends[0].url]) as server:
        seen = httpx.get(
            server.url + "/x",
            headers={
                "Proxy": "http://evil:1",
                "Proxy-Foo": "1",
                "Proxyish": "kept",
                "Proxy-Authorization": "x",
            },
        ).json()["headers"]
    assert "proxy" not in seen and "proxy-foo" not in seen and "proxy-authorization" not in seen
    assert seen["proxyish"] == "kept"


def test_routes_match_the_normalised_path_and_forward_the_bytes(echo_factory: Any) -> None:
    default: EchoBackend = echo_factory("default")
    api: EchoBackend = echo_factory("api")
    static: EchoBackend = echo_factory("static")
    routes = [
        {"prefix": "/api", "backends": [api.url]},
        {"prefix": "/static", "backends": [static.url], "strip_prefix": True},
    ]
    with run_lb([default.url], routes=routes) as server:

        def get(target: bytes) -> tuple[int, dict[str, Any]]:
            answer = raw_request(
                server.port, b"GET %b HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n" % target
            )
            status, _ = head_of(answer)
            body = answer.split(b"\r\n\r\n", 1)[1]
            return status, (httpx.Response(200, content=body).json() if status == 200 else {})

        status, seen = get(b"/api/../admin")
        assert (status, seen["server"], seen["raw_path"]) == (200, "default", "/api/../admin")
        status, seen = get(b"/x/../api/users")
        assert (status, seen["server"]) == (200, "api")
        assert get(b"/static/../../etc/passwd")[0] == 400
        status, seen = get(b"/static/css/../app.js")
        assert (status, seen["server"], seen["raw_path"]) == (200, "static", "/app.js")
