"""Circuit breaking: a per-backend in-flight cap, a bounded queue with a timeout, then 503."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from .conftest import EchoBackend, run_lb, wait_until


async def test_backend_at_its_cap_is_skipped(echo_factory: Any) -> None:
    a: EchoBackend = echo_factory("a")
    b: EchoBackend = echo_factory("b")
    with run_lb([a.url, b.url], backend_max_conns=1) as server:
        backends = server.app.state.clusters.default.pool.backends
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            slow = asyncio.create_task(client.get("/sleep/1"))
            await asyncio.to_thread(wait_until, lambda: sum(x.in_flight for x in backends) == 1)
            busy = next(x for x in backends if x.in_flight == 1)
            other = "b" if busy.url == a.url else "a"
            # Round robin would alternate; the busy backend is at its cap, so the other one takes all.
            answers = [(await client.get("/")).headers["x-backend"] for _ in range(4)]
            assert answers == [other] * 4
            assert (await slow).status_code == 200


async def test_full_backends_queue_then_503_with_retry_after(echo_factory: Any) -> None:
    a: EchoBackend = echo_factory("a")
    with run_lb([a.url], backend_max_conns=1, queue_size=1, queue_timeout=0.3) as server:
        backend = server.app.state.clusters.default.pool.backends[0]
        queue = server.app.state.clusters.default.pool.queue
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            slow = asyncio.create_task(client.get("/sleep/5"))
            await asyncio.to_thread(wait_until, lambda: backend.in_flight == 1)
            queued = asyncio.create_task(client.get("/"))
            await asyncio.to_thread(wait_until, lambda: len(queue) == 1)
            # The queue holds one: the next request is refused while the queued one still waits.
            refused = await client.get("/")
            assert not queued.done()
            response = await queued
            assert not slow.done()  # the queue timeout ended the wait, not the slow request's end
            assert (await slow).status_code == 200
            document = (await client.get("/lb-metrics")).json()
    for answer in (refused, response):
        assert answer.status_code == 503
        assert answer.headers["retry-after"] == "1"
        assert answer.json() == {"error": "all backends are at capacity"}
    assert document["failed_requests"] == 2


async def test_queued_requests_are_served_in_arrival_order_when_slots_free(echo_factory: Any) -> None:
    a: EchoBackend = echo_factory("a")
    with run_lb([a.url], backend_max_conns=1, queue_size=10, queue_timeout=5) as server:
        backend = server.app.state.clusters.default.pool.backends[0]
        queue = server.app.state.clusters.default.pool.queue
        finished: list[str] = []

        async def get(client: httpx.AsyncClient, path: str) -> httpx.Response:
            response = await client.get(path)
            finished.append(path)
            return response

        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            busy = asyncio.create_task(get(client, "/sleep/0.3"))
            await asyncio.to_thread(wait_until, lambda: backend.in_flight == 1)
            queued = []
            for i in range(4):  # one at a time, so the arrival order is known
                queued.append(asyncio.create_task(get(client, f"/q{i}")))
                await asyncio.to_thread(wait_until, lambda n=i + 1: len(queue) == n)
            results = await asyncio.gather(busy, *queued)
        assert [r.status_code for r in results] == [200] * 5
        assert finished == ["/sleep/0.3", "/q0", "/q1", "/q2", "/q3"]  # one at a time, FIFO
        assert backend.in_flight == 0 and len(queue) == 0
