"""End to end: a real lbapp in front of a raw-socket backend that breaks HTTP on purpose.

The backend (tests/rawbackend.py) sends exactly the bytes each path asks for and records every
request it read, per connection, so the tests can show what reached the client, which connection
served the next request, and how many times a request reached the backend.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .conftest import ThreadedServer, raw_request, run_lb, wait_until
from .rawbackend import OK, RawBackend, RawConnection, path_of

INJECTED = b"HTTP/1.1 200 OK\r\nSet-Cookie: sid=attacker\r\nContent-Length: 5\r\n\r\nevil!"
ANSWERS = {
    b"/trailing-cookie": OK + INJECTED,
    b"/trailing-length": OK + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
    b"/204-with-body": b"HTTP/1.1 204 No Content\r\n\r\n" + INJECTED,
    b"/status-999": b"HTTP/1.1 999 Nine\r\nContent-Length: 2\r\n\r\nok",
    b"/status-000": b"HTTP/1.1 000 Zero\r\nContent-Length: 2\r\n\r\nok",
    b"/status-line": b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok",
}


class Sloppy:
    """The misbehaving backend's script: per path; ``/late`` sends more bytes once ``late`` is set."""

    def __init__(self) -> None:
        self.late = threading.Event()
        self.late_connection: RawConnection | None = None

    def __call__(self, conn: RawConnection) -> None:
        while (raw := conn.read_request()) is not None:
            path = path_of(raw)
            conn.send(ANSWERS.get(path, OK))
            if path == b"/late":
                self.late_connection = conn
                self.late.wait(10)
                conn.send(INJECTED)  # long after the complete response: the connection is idle
                conn.wait_closed_by_peer()
                return


@pytest.fixture
def sloppy() -> Iterator[tuple[Sloppy, RawBackend, ThreadedServer]]:
    script = Sloppy()
    with RawBackend(script) as backend, run_lb([backend.url], max_retries=0) as server:
        yield script, backend, server


def clean_and_elsewhere(backend: RawBackend, server: ThreadedServer, sloppy_line: bytes) -> None:
    """The next request gets a clean answer, on another backend connection than the sloppy one."""
    response = httpx.get(server.url + "/clean", timeout=10)
    assert (response.status_code, response.content) == (200, b"ok")
    assert "set-cookie" not in response.headers
    assert response.headers.get_list("content-length") == ["2"]
    [sloppy_connection] = backend.received(sloppy_line)
    [clean_connection] = backend.received(b"GET /clean ")
    assert clean_connection != sloppy_connection


@pytest.mark.parametrize("path", ["/trailing-cookie", "/trailing-length"])
def test_bytes_after_a_response_never_reach_the_client(sloppy: Any, path: str) -> None:
    _, backend, server = sloppy
    response = httpx.get(server.url + path, timeout=10)
    assert (response.status_code, response.content) == (200, b"ok")
    assert "set-cookie" not in response.headers
    assert response.headers.get_list("content-length") == ["2"]
    clean_and_elsewhere(backend, server, f"GET {path} ".encode())


def test_204_with_a_body_is_cut_and_its_connection_closed(sloppy: Any) -> None:
    _, backend, server = sloppy
    response = httpx.get(server.url + "/204-with-body", timeout=10)
    assert (response.status_code, response.content) == (204, b"")
    assert "set-cookie" not in response.headers
    clean_and_elsewhere(backend, server, b"GET /204-with-body ")


def test_late_bytes_after_a_complete_response_do_not_poison_the_next_request(sloppy: Any) -> None:
    script, backend, server = sloppy
    response = httpx.get(server.url + "/late", timeout=10)
    assert (response.status_code, response.content) == (200, b"ok")
    script.late.set()
    connection = wait_until(lambda: script.late_connection)
    wait_until(connection.closed_by_peer.is_set)  # lbapp closed the idle connection that got them
    clean_and_elsewhere(backend, server, b"GET /late ")


@pytest.mark.parametrize("path", ["/status-999", "/status-000", "/status-line"])
def test_bad_status_gives_502_and_the_worker_keeps_serving(sloppy: Any, path: str) -> None:
    _, backend, server = sloppy
    response = httpx.get(server.url + path, timeout=10)
    assert response.status_code == 502
    assert response.json() == {"error": "bad gateway"}
    assert len(response.content) < 100
    clean_and_elsewhere(backend, server, f"GET {path} ".encode())


def closes_after_reading_request_2(conn: RawConnection) -> None:
    """Keep-alive after ``/warm``, then read the next request completely and close unanswered."""
    raw = conn.read_request()
    if raw is None:
        return
    conn.send(OK)
    if path_of(raw) == b"/warm":
        conn.read_request()
        return
    while conn.read_request() is not None:
        conn.send(OK)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


@pytest.mark.parametrize(
    ("request_bytes", "status", "deliveries"),
    [
        (b"POST /once HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n", 502, 1),
        (b"POST /once HTTP/1.1\r\nHost: lb\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", 502, 1),
        (b"GET /once HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n", 200, 2),
    ],
    ids=["post-no-body", "post-content-length-0", "get"],
)
def test_a_reused_connection_closed_after_the_request_never_sends_a_post_twice(
    request_bytes: bytes, status: int, deliveries: int
) -> None:
    with RawBackend(closes_after_reading_request_2) as backend, run_lb([backend.url]) as server:
        assert httpx.get(server.url + "/warm", timeout=10).status_code == 200
        answer = raw_request(server.port, request_bytes)
        assert status_of(answer) == status
        line = request_bytes.split(b"\r\n", 1)[0]
        assert len(backend.received(line)) == deliveries
        [warm_connection] = backend.received(b"GET /warm ")
        assert backend.received(line)[0] == warm_connection  # it went out on the reused connection
