"""Fault backends end to end: each misbehaviour gives the client a clear failure or the right answer.

A raw-socket backend (tests/rawbackend.py) behind a real lbapp misbehaves as the path says: it breaks
a chunked body off, stalls or resets mid-body, sends an invalid or conflicting `Content-Length`,
garbage, nothing at all, its answer after the timeout, or interim 1xx answers before the final one.
The client must get lbapp's 502/504, an aborted connection when the body broke off after the head
was relayed (never a body that looks complete), or the right answer; never later than the
configured timeout allows; the broken upstream connection is closed, never reused; and a healthy
backend on another route keeps serving while the fault is in progress.

Not repeated here: a FIN or RST right after the request, and silence, with retries on both
transports (test_retries.py); bytes after a complete answer and bad status lines
(test_sloppy_backend.py); a Content-Length body cut short by a real backend
(test_truncated_response.py); the same parser cases without lbapp (test_connection.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from .conftest import EchoBackend, run_lb, wait_until
from .rawbackend import RawBackend, RawConnection, path_of

TIMEOUT = 1.0  # LB_UPSTREAM_TIMEOUT in these tests
BAD_LENGTH = b"HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\n1x"
HEAD_200_CL10 = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"


def hold(conn: RawConnection) -> None:
    """Stay silent until lbapp closes the connection (it must, after its timeout)."""
    conn.wait_closed_by_peer()


def late_answer(conn: RawConnection) -> None:
    """Answer, but only after lbapp has given up (its timeout) or three times the timeout."""
    waited = threading.Thread(target=conn.wait_closed_by_peer, daemon=True)
    waited.start()
    waited.join(3 * TIMEOUT)
    conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate")


def reset_mid_body(conn: RawConnection) -> None:
    conn.send(HEAD_200_CL10 + b"12345")
    conn.reset()


def stall_mid_body(conn: RawConnection) -> None:
    conn.send(HEAD_200_CL10 + b"12345")
    hold(conn)


def close_mid_chunk(conn: RawConnection) -> None:
    conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n100\r\n" + b"x" * 50)


def sends(data: bytes) -> Callable[[RawConnection], None]:
    def script(conn: RawConnection) -> None:
        conn.send(data)
        hold(conn)  # the connection stays open: lbapp must close it, not reuse it

    return script


INTERIM = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
# name: (script, expected outcome, lbapp closes the connection, at least TIMEOUT elapses)
FAULTS: dict[str, tuple[Callable[[RawConnection], None], tuple[str, int], bool, bool]] = {
    "close-mid-chunk": (close_mid_chunk, ("aborted", 200), False, False),
    "reset-mid-body": (reset_mid_body, ("aborted", 200), False, False),
    "stall-mid-body": (stall_mid_body, ("aborted", 200), True, True),
    "invalid-length": (sends(BAD_LENGTH), ("status", 502), True, False),
    "conflicting-lengths": (
        sends(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!"),
        ("status", 502),
        True,
        False,
    ),
    "garbage": (sends(b"\x00\x01\xfe\xffSSH-2.0-nonsense\r\n\r\n"), ("status", 502), True, False),
    "never-answers": (hold, ("status", 504), True, True),
    "answers-too-late": (late_answer, ("status", 504), True, True),
    "interim-then-final": (
        sends(INTERIM + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
        ("answer", 200),
        False,
        False,
    ),
}


class Faulty:
    """The raw backend's script: the last path segment names the fault; health checks pass."""

    def __init__(self) -> None:
        self.faulted: list[RawConnection] = []

    def __call__(self, conn: RawConnection) -> None:
        while (raw := conn.read_request()) is not None:
            name = path_of(raw).rsplit(b"/", 1)[-1].decode()
            self.faulted.append(conn)
            FAULTS[name][0](conn)
            if name != "interim-then-final":
                return


def fetch(url: str) -> tuple[tuple[str, int], bytes, float]:
    started = time.monotonic()
    try:
        with httpx.stream("GET", url, timeout=15) as response:
            status = response.status_code
            try:
                body = response.read()
            except httpx.TransportError:
                return ("aborted", status), b"", time.monotonic() - started
    except httpx.TransportError:
        return ("no answer", 0), b"", time.monotonic() - started
    kind = "answer" if status < 500 else "status"
    return (kind, status), body, time.monotonic() - started


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_faulty_backend_gives_a_clear_answer_and_others_keep_serving(
    echo_backends: list[EchoBackend], fault: str
) -> None:
    _, expected, closes, slow = FAULTS[fault]
    script = Faulty()
    with RawBackend(script) as raw:
        routes = [{"prefix": "/fault", "backends": [raw.url]}]
        with run_lb([echo_backends[0].url], routes=routes, upstream_timeout=TIMEOUT, max_retries=0) as server:
            result: dict[str, Any] = {}
            faulty = threading.Thread(target=lambda: result.update(out=fetch(f"{server.url}/fault/{fault}")))
            faulty.start()
            wait_until(lambda: script.faulted, timeout=10)  # the fault is under way
            with httpx.Client(base_url=server.url, timeout=10) as client:
                for n in range(10):
                    response = client.get(f"/meanwhile/{n}")
                    assert (response.status_code, response.json()["server"]) == (200, "backend-1")
            faulty.join(timeout=20)
            outcome, body, elapsed = result["out"]
            assert outcome == expected
            if expected == ("status", 502):
                assert body == b'{"error": "bad gateway"}'
            if expected == ("status", 504):
                assert body == b'{"error": "gateway timeout"}'
            if expected == ("answer", 200):
                assert body == b"ok"
            if slow:
                assert elapsed >= TIMEOUT  # a lower bound only: the timeout was waited out, not less
            if closes:
                [conn] = script.faulted
                wait_until(conn.closed_by_peer.is_set, timeout=10)  # dropped, never pooled
            pool = server.app.state.clusters.route(b"/fault/x").pool
            wait_until(lambda: pool.backends[0].in_flight == 0, timeout=10)
            again = httpx.get(server.url + "/after", timeout=10)
            assert again.status_code == 200
