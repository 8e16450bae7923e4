"""A client that goes away releases its upstream connection: the pool never leaks."""

from __future__ import annotations

import socket

import httpx

from .conftest import EchoBackend, run_lb, wait_until


def test_aborted_downloads_do_not_leak_upstream_connections(echo_backends: list[EchoBackend]) -> None:
    with run_lb([echo_backends[0].url], upstream_max_connections=4, upstream_timeout=5) as server:
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
                sock.sendall(b"GET /bytes/1073741824 HTTP/1.1\r\nHost: h\r\n\r\n")
                assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        backend = server.app.state.clusters.default.pool.backends[0]
        wait_until(lambda: backend.in_flight == 0, timeout=10)
        with httpx.Client(base_url=server.url, timeout=5) as client:
            for _ in range(10):
                assert client.get("/after").status_code == 200


def test_client_gone_while_waiting_for_headers_cancels_the_upstream_request(echo_factory: object) -> None:
    slow = echo_factory("slow", "--latency", "30")  # type: ignore[operator]
    with run_lb([slow.url], upstream_max_connections=1, upstream_timeout=60) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"GET /wait HTTP/1.1\r\nHost: h\r\n\r\n")
            backend = server.app.state.clusters.default.pool.backends[0]
            wait_until(lambda: backend.in_flight == 1, timeout=10)
        wait_until(lambda: backend.in_flight == 0, timeout=10)
