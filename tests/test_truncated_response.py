"""A backend that dies mid-response must never look like a complete response to the client."""

from __future__ import annotations

import httpx
import pytest

from .conftest import ThreadedServer, raw_request, wait_until


def test_truncated_body_aborts_the_client_connection(lb: ThreadedServer) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(lb.url + "/truncate/5000")


def test_truncated_body_is_not_completed_on_the_wire(lb: ThreadedServer) -> None:
    response = raw_request(lb.port, b"GET /truncate/5000 HTTP/1.1\r\nHost: h\r\n\r\n")
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"content-length: 10000" in head.lower()
    assert len(body) == 5000  # the connection was closed short of the promised length


def test_the_load_balancer_keeps_serving_after_a_truncation(lb: ThreadedServer) -> None:
    for _ in range(3):
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(lb.url + "/truncate/100")
    assert httpx.get(lb.url + "/ok").status_code == 200
    backends = lb.app.state.clusters.default.pool.backends
    wait_until(lambda: all(b.in_flight == 0 for b in backends), timeout=5)
