"""Retries: connect failures go to another backend; nothing unsafe is ever sent twice.

Every failure mode is produced by a live backend (a refused port, or a raw-socket backend that
closes, resets or stays silent at a chosen moment) and every test runs on both transports, the
default lean one and httpcore. The raw backends count what reached them, so "sent once" is counted
where it matters. Round robin sends a fresh load balancer's first request to the first backend.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from .conftest import EchoBackend, ThreadedServer, listening_socket, run_lb, wait_until
from .rawbackend import OK, RawBackend, RawConnection, path_of

TRANSPORTS = pytest.mark.parametrize("transport", ["lean", "httpcore"])
Script = Callable[[RawConnection], None]


def dead_port() -> int:
    sock = listening_socket()
    port: int = sock.getsockname()[1]
    sock.close()  # nothing listens there now: connects are refused
    return port


def health_or(conn: RawConnection, then: Callable[[RawConnection, bytes], None]) -> None:
    """Answer health checks; hand the first other request (already read and counted) to ``then``."""
    while (raw := conn.read_request()) is not None:
        if path_of(raw) != b"/health":
            then(conn, raw)
            return
        conn.send(OK)


def echo(conn: RawConnection) -> None:
    """A tidy backend: 200 with the request body as the body, keep-alive."""
    while (raw := conn.read_request()) is not None:
        body = raw.split(b"\r\n\r\n", 1)[1]
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))


def closes_after_request(conn: RawConnection) -> None:
    health_or(conn, lambda c, raw: None)  # read it all, then FIN without answering


def resets_after_request(conn: RawConnection) -> None:
    health_or(conn, lambda c, raw: c.reset())


def silent_after_request(conn: RawConnection) -> None:
    health_or(conn, lambda c, raw: c.wait_closed_by_peer())


def resets_on_accept(conn: RawConnection) -> None:
    conn.reset()  # before reading anything


@contextlib.contextmanager
def broken_then_tidy(
    broken: Script, **settings: Any
) -> Iterator[tuple[RawBackend, RawBackend, ThreadedServer]]:
    """A load balancer over [a broken backend, a tidy one]; the first request goes to the broken one."""
    with RawBackend(broken) as a, RawBackend(echo) as b, run_lb([a.url, b.url], **settings) as server:
        yield a, b, server


@TRANSPORTS
def test_connect_refused_is_retried_on_another_backend(
    echo_backends: list[EchoBackend], transport: str
) -> None:
    dead = f"http://127.0.0.1:{dead_port()}"
    with (
        run_lb([dead, echo_backends[0].url], max_retries=1, transport=transport) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        for _ in range(6):
            response = client.post("/once", content=b"payload")
            assert response.status_code == 200
            assert response.json()["body_bytes"] == 7
        document = client.get("/lb-metrics").json()
    assert document["retry_attempts"] == 3
    dead_stats = next(b for b in document["backends"] if b["url"] == dead)
    assert dead_stats["total_failures"] == 3


@TRANSPORTS
@pytest.mark.parametrize(
    "broken",
    [closes_after_request, resets_after_request, resets_on_accept],
    ids=["close", "reset", "reset-early"],
)
def test_get_is_retried_after_a_broken_connection(broken: Script, transport: str) -> None:
    with broken_then_tidy(broken, transport=transport) as (a, b, server):
        response = httpx.get(server.url + "/x", timeout=10)
        assert (response.status_code, response.content) == (200, b"")
        assert len(a.received(b"GET /x ")) == (0 if broken is resets_on_accept else 1)
        assert len(b.received(b"GET /x ")) == 1


@TRANSPORTS
@pytest.mark.parametrize("method", ["POST", "PATCH", "PUT"])
@pytest.mark.parametrize("broken", [closes_after_request, resets_after_request], ids=["close", "reset"])
def test_a_request_with_a_body_is_never_sent_twice_after_it_reached_a_backend(
    broken: Script, method: str, transport: str
) -> None:
    """PUT is idempotent, but its streamed body was not kept: it cannot be sent again either."""
    with broken_then_tidy(broken, transport=transport) as (a, b, server):
        response = httpx.request(method, server.url + "/x", content=b"pay", timeout=10)
        assert response.status_code == 502
        assert response.json() == {"error": "bad gateway"}
        assert len(a.received(f"{method} /x ".encode())) == 1
        assert b.received(f"{method} /x ".encode()) == []


@TRANSPORTS
def test_read_timeout_gives_504_and_no_retry(transport: str) -> None:
    with (
        RawBackend(silent_after_request) as a,
        RawBackend(silent_after_request) as b,
        run_lb([a.url, b.url], upstream_timeout=0.3, transport=transport) as server,
    ):
        response = httpx.get(server.url + "/slow", timeout=10)
        assert response.status_code == 504
        assert response.json() == {"error": "gateway timeout"}
        assert len(a.received(b"GET /slow ")) + len(b.received(b"GET /slow ")) == 1


@TRANSPORTS
def test_gives_up_with_502_after_max_retries(transport: str) -> None:
    dead = [f"http://127.0.0.1:{dead_port()}" for _ in range(2)]
    with run_lb(dead, max_retries=2, transport=transport) as server:
        response = httpx.get(server.url + "/x", timeout=10)
        document = httpx.get(server.url + "/lb-metrics", timeout=10).json()
    assert response.status_code == 502
    assert sum(b["total_failures"] for b in document["backends"]) == 3
    assert document["failed_requests"] == 1
    assert document["retry_attempts"] == 2


@TRANSPORTS
@pytest.mark.parametrize(("key", "status"), [(True, 200), (False, 502)], ids=["with-key", "without-key"])
def test_idempotency_key_makes_a_post_retryable_after_it_was_sent(
    key: bool, status: int, transport: str
) -> None:
    headers = {"idempotency-key": "k-1"} if key else {}
    with broken_then_tidy(closes_after_request, transport=transport) as (a, b, server):
        response = httpx.post(server.url + "/x", content=b"pay", headers=headers, timeout=10)
        assert response.status_code == status
        [(_, sent)] = [(n, raw) for n, raw in a.requests if raw.startswith(b"POST /x ")]
        assert sent.endswith(b"\r\n\r\npay")
        replays = b.received(b"POST /x ")
        if key:
            assert response.content == b"pay"  # the same body, sent again
            assert len(replays) == 1
        else:
            assert replays == []  # never sent twice


class Gated:
    """Reads a request, holds it until its round's gate opens, then closes without answering.

    Round one is a request's first attempt, round two any retry (told apart by the x-n header), so
    a test can hold every first attempt in flight at once, and then every retry, without timing.
    """

    def __init__(self) -> None:
        self.first, self.retries = threading.Event(), threading.Event()
        self.attempts: dict[bytes, int] = {}
        self.lock = threading.Lock()

    def __call__(self, conn: RawConnection) -> None:
        health_or(conn, self._hold)

    def _hold(self, conn: RawConnection, raw: bytes) -> None:
        n = raw.lower().split(b"\r\nx-n: ", 1)[1].split(b"\r\n", 1)[0]
        with self.lock:
            self.attempts[n] = self.attempts.get(n, 0) + 1
            gate = self.first if self.attempts[n] == 1 else self.retries
        gate.wait(20)

    def total(self) -> int:
        with self.lock:
            return sum(self.attempts.values())


@pytest.mark.parametrize(("budget", "retries", "denied"), [(100.0, 60, 0), (10.0, 6, 18)])
def test_retry_budget_stops_a_retry_storm(budget: float, retries: int, denied: int) -> None:
    """20 requests fail at once: with a 10% budget only max(2, 10% of 20) = 2 of them may retry."""
    gated = Gated()
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(RawBackend(gated)).url for _ in range(3)]
        server = stack.enter_context(
            run_lb(
                urls, max_retries=3, retry_budget=budget, retry_budget_min=2, outlier_consecutive_failures=0
            )
        )
        with concurrent.futures.ThreadPoolExecutor(20) as executor:

            def get(n: int) -> int:
                return httpx.get(server.url + "/", headers={"x-n": str(n)}, timeout=20).status_code

            futures = [executor.submit(get, n) for n in range(20)]
            wait_until(lambda: gated.total() == 20)  # every first attempt is in flight
            gated.first.set()
            wait_until(lambda: sum(f.done() for f in futures) == denied and gated.total() == 20 + 20 - denied)
            gated.retries.set()
            assert [f.result() for f in futures] == [502] * 20
        samples = server.app.state.metrics.samples()
        document = httpx.get(server.url + "/lb-metrics").json()
        refused = samples.total("lb_retries_total", reason="budget_exhausted")
        assert (samples.total("lb_retries_total") - refused, refused) == (retries, denied)
        assert document["retry_attempts"] == retries  # /lb-metrics counts attempts, not refusals
        assert server.app.state.proxy.budget.retrying == 0  # every slot was given back
