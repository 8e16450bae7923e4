"""1,000 clients that go away mid-request or mid-response leave nothing behind.

Clients open a connection, start an upload (a body declared at 1 MiB, broken off after 16 KiB,
before lbapp chose a backend, or after 128 KiB, once it streams to one) or a large streamed download,
wait until lbapp has the exchange in flight upstream, and then close (half with a FIN, half with an
RST). Afterwards, polled with a deadline: the in-flight gauges are 0 (`stats.in_flight` and every
backend's), every upstream connection is back in the pool or closed (none active, none waited for),
the open file descriptors of the process serving lbapp are back to the baseline (apart from idle
upstream connections, which the pool may keep), and lbapp still serves.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any

import httpx

from .conftest import EchoBackend, ThreadedServer, run_lb, wait_until

CLIENTS = 1000
WAVE = 100  # clients in flight at once


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Gauges:
    """What a leak would show, read from the load balancer's own objects."""

    def __init__(self, server: ThreadedServer, backends: list[EchoBackend]) -> None:
        self.state = server.app.state
        self.ports = [b.port for b in backends]

    @property
    def pools(self) -> list[Any]:
        transport = self.state.proxy.upstream.transport
        return [transport.origin_pool("http", "127.0.0.1", port) for port in self.ports]

    def upstream_in_flight(self) -> int:
        return sum(b.in_flight for b in self.state.clusters.default.pool.backends)

    def idle(self) -> int:
        return sum(len(pool.idle) for pool in self.pools if pool is not None)

    def active(self) -> int:
        """Upstream connections in use or being opened (the pool's slots minus its idle ones)."""
        return sum(pool.total - len(pool.idle) + pool.waiting for pool in self.pools if pool is not None)

    def settled(self) -> bool:
        return self.state.stats.in_flight == 0 and self.upstream_in_flight() == 0 and self.active() == 0


def abort(sock: socket.socket, rst: bool) -> None:
    if rst:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def wave(port: int, gauges: Gauges, kind: str, count: int, first: int) -> None:
    """`count` clients start an exchange of `kind`; once lbapp has them all in flight, they go."""
    socks = []
    try:
        for n in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            socks.append(sock)
            if kind == "download":
                sock.sendall(b"GET /bytes/1073741824 HTTP/1.1\r\nHost: lb\r\n\r\n")
            else:
                part = 16 * 1024 if n % 2 else 128 * 1024  # before / after request buffering (64 KiB)
                sock.sendall(b"POST /upload HTTP/1.1\r\nHost: lb\r\nContent-Length: 1048576\r\n\r\n")
                sock.sendall(b"u" * part)
        if kind == "download":
            for sock in socks:  # the response is streaming: its head and first bytes arrived
                assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        else:
            streaming = count // 2 + count % 2  # the 128 KiB ones are being sent upstream
            wait_until(lambda: gauges.upstream_in_flight() == streaming, timeout=30)
        wait_until(lambda: gauges.state.stats.in_flight == count, timeout=30)
    finally:
        for n, sock in enumerate(socks):
            abort(sock, rst=(first + n) % 2 == 0)


def test_a_thousand_aborted_exchanges_leak_nothing(echo_backends: list[EchoBackend]) -> None:
    backends = echo_backends
    with run_lb([b.url for b in backends], upstream_timeout=30, client_body_timeout=30) as server:
        with httpx.Client(base_url=server.url, timeout=10) as client:  # every origin pool exists
            for _ in range(len(backends)):
                assert client.get("/warm").status_code == 200
        gauges = Gauges(server, backends)
        wait_until(gauges.settled)
        baseline = open_fds() - gauges.idle()

        for first in range(0, CLIENTS, WAVE):
            kind = "upload" if (first // WAVE) % 2 == 0 else "download"
            wave(server.port, gauges, kind, WAVE, first)

        wait_until(gauges.settled, timeout=30)
        wait_until(lambda: open_fds() - gauges.idle() <= baseline, timeout=30)
        assert gauges.state.stats.in_flight == 0
        assert all(pool is not None and pool.waiting == 0 for pool in gauges.pools)
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for n in range(2 * len(backends)):
                response = client.post(f"/after/{n}", content=b"z" * 200_000)
                assert (response.status_code, response.json()["body_bytes"]) == (200, 200_000)


def test_gauges_see_an_exchange_in_flight(echo_backends: list[EchoBackend]) -> None:
    """The gauges the test above relies on do move: a held download shows in all of them."""
    with run_lb([echo_backends[0].url]) as server:
        gauges = Gauges(server, echo_backends[:1])
        before = open_fds()
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"GET /bytes/1073741824 HTTP/1.1\r\nHost: lb\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            assert (gauges.state.stats.in_flight, gauges.upstream_in_flight(), gauges.active()) == (1, 1, 1)
            assert open_fds() >= before + 3  # the client's socket, lbapp's side of it, and upstream's
            assert not gauges.settled()
        wait_until(gauges.settled, timeout=10)
