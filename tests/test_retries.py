"""Retries: connect failures go to another backend; nothing unsafe is ever sent twice."""

from __future__ import annotations

import concurrent.futures
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import respx

from lbapp import create_app

from .conftest import EchoBackend, listening_socket, make_settings, run_lb

A, B = "http://backend-a.test", "http://backend-b.test"


@contextlib.asynccontextmanager
async def lb_client(**overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The app driven in-process, so respx can stand in for backends that misbehave on demand."""
    app = create_app(make_settings([A, B], transport="httpcore", **overrides))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://lb.test") as client:
            yield client


@pytest.fixture
def mock() -> Any:
    with respx.mock(assert_all_called=False) as router:
        router.get(path="/health").respond(200)
        yield router


def dead_port() -> int:
    sock = listening_socket()
    port: int = sock.getsockname()[1]
    sock.close()  # nothing listens there now: connects are refused
    return port


def test_connect_refused_is_retried_on_another_backend(echo_backends: list[EchoBackend]) -> None:
    dead = f"http://127.0.0.1:{dead_port()}"
    with (
        run_lb([dead, echo_backends[0].url], max_retries=1) as server,
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


async def test_connect_error_on_first_attempt_then_success(mock: Any) -> None:
    mock.get(f"{A}/x").mock(side_effect=httpx.ConnectError("refused"))
    mock.get(f"{B}/x").respond(200, text="from b")
    async with lb_client() as client:
        response = await client.get("/x")
    assert response.status_code == 200
    assert response.text == "from b"


async def test_get_is_retried_after_a_broken_connection(mock: Any) -> None:
    route_a = mock.get(f"{A}/x").mock(side_effect=httpx.RemoteProtocolError("server disconnected"))
    route_b = mock.get(f"{B}/x").respond(200, text="ok")
    async with lb_client() as client:
        response = await client.get("/x")
    assert response.status_code == 200
    assert route_a.call_count == 1 and route_b.call_count == 1


async def test_post_is_never_sent_twice_after_it_reached_a_backend(mock: Any) -> None:
    route_a = mock.post(f"{A}/x").mock(side_effect=httpx.RemoteProtocolError("server disconnected"))
    route_b = mock.post(f"{B}/x").respond(200)
    async with lb_client() as client:
        response = await client.post("/x", content=b"pay")
    assert response.status_code == 502
    assert response.json() == {"error": "bad gateway"}
    assert route_a.call_count + route_b.call_count == 1


async def test_put_with_a_streamed_body_is_not_retried(mock: Any) -> None:
    route_a = mock.put(f"{A}/x").mock(side_effect=httpx.ReadError("reset"))
    route_b = mock.put(f"{B}/x").respond(200)
    async with lb_client() as client:
        response = await client.put("/x", content=b"body")
    assert response.status_code == 502
    assert route_a.call_count + route_b.call_count == 1


async def test_read_timeout_gives_504_and_no_retry(mock: Any) -> None:
    route_a = mock.get(f"{A}/slow").mock(side_effect=httpx.ReadTimeout("slow"))
    route_b = mock.get(f"{B}/slow").mock(side_effect=httpx.ReadTimeout("slow"))
    async with lb_client() as client:
        response = await client.get("/slow")
    assert response.status_code == 504
    assert response.json() == {"error": "gateway timeout"}
    assert route_a.call_count + route_b.call_count == 1


async def test_gives_up_with_502_after_max_retries(mock: Any) -> None:
    route_a = mock.get(f"{A}/x").mock(side_effect=httpx.ConnectError("refused"))
    route_b = mock.get(f"{B}/x").mock(side_effect=httpx.ConnectError("refused"))
    async with lb_client(max_retries=2) as client:
        response = await client.get("/x")
        document = (await client.get("/lb-metrics")).json()
    assert response.status_code == 502
    assert route_a.call_count + route_b.call_count == 3
    assert document["failed_requests"] == 1
    assert document["retry_attempts"] == 2


def test_slow_backend_gives_504(echo_factory: Any) -> None:
    slow = echo_factory("slow")
    with run_lb([slow.url], upstream_timeout=0.3, max_retries=0) as server:
        response = httpx.get(server.url + "/sleep/5", timeout=10)
    assert response.status_code == 504
    assert "Traceback" not in response.text


async def test_idempotency_key_makes_a_post_retryable_after_it_was_sent(mock: Any) -> None:
    seen: list[bytes] = []

    def broken(request: httpx.Request) -> httpx.Response:
        seen.append(request.read())
        raise httpx.RemoteProtocolError("server disconnected")

    route_a = mock.post(f"{A}/x").mock(side_effect=broken)
    route_b = mock.post(f"{B}/x").mock(
        side_effect=lambda request: httpx.Response(200, content=request.read())
    )
    async with lb_client() as client:
        response = await client.post("/x", content=b"pay", headers={"idempotency-key": "k-1"})
        assert response.status_code == 200
        assert response.content == b"pay"  # the same body, sent again
        assert seen == [b"pay"]
        assert route_a.call_count == 1 and route_b.call_count == 1
        # The same failure without the key: never sent twice.
        response = await client.post("/x", content=b"pay")
        assert response.status_code in (200, 502)
        assert route_a.call_count + route_b.call_count == 3


def test_retry_budget_stops_a_retry_storm(echo_factory: Any) -> None:
    """Every backend refuses: without a budget each request retries; with one, few may at once."""
    dead = [f"http://127.0.0.1:{dead_port()}" for _ in range(3)]

    def storm(budget: float) -> dict[str, Any]:
        with run_lb(
            dead,
            max_retries=3,
            retry_delay=0.2,
            retry_budget=budget,
            retry_budget_min=2,
            outlier_consecutive_failures=0,
            health_interval=60,
        ) as server:
            with concurrent.futures.ThreadPoolExecutor(20) as executor:
                statuses = list(
                    executor.map(lambda _: httpx.get(server.url + "/", timeout=10).status_code, range(20))
                )
            assert statuses == [502] * 20
            samples = server.app.state.metrics.samples()
            document = httpx.get(server.url + "/lb-metrics").json()
            # /lb-metrics counts attempts only, not the retries the budget refused.
            assert document["retry_attempts"] == samples.total("lb_retries_total", reason="connect")
            return {
                "retries": samples.total("lb_retries_total")
                - samples.total("lb_retries_total", reason="budget_exhausted"),
                "denied": samples.total("lb_retries_total", reason="budget_exhausted"),
                "retrying": server.app.state.proxy.budget.retrying,
            }

    unlimited = storm(100.0)
    assert unlimited["retries"] == 60 and unlimited["denied"] == 0
    limited = storm(10.0)
    # At most max(2, 10% of 20 live requests) = 2 requests retry at once, each up to 3 times.
    assert limited["denied"] >= 15
    assert limited["retries"] <= 3 * (20 - limited["denied"])
    assert limited["retries"] < 20
    assert limited["retrying"] == 0  # every slot was given back
