"""Draining through the admin API, panic mode, slow start; each state visible in both views."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from lbapp.backend import DRAINING, EJECTED, HEALTHY, UNHEALTHY
from lbapp.balancers import LeastConn, WeightedRoundRobin
from lbapp.policy import RequestInfo
from lbapp.pool import Pool
from lbapp.settings import BackendSpec
from lbapp.views import Samples

from .conftest import EchoBackend, mark_down, run_lb, wait_until

REQUEST = RequestInfo({"headers": []}, "1.2.3.4")


class FakeClock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def pool_of(count: int, **options: Any) -> Pool:
    return Pool([BackendSpec(url=f"http://b{i}:80", weight=2) for i in range(count)], **options)


async def test_draining_backend_finishes_in_flight_requests_and_gets_no_new_ones(echo_factory: Any) -> None:
    a: EchoBackend = echo_factory("a")
    b: EchoBackend = echo_factory("b")
    with run_lb([a.url, b.url]) as server:
        pool = server.app.state.clusters.default.pool
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            slow = asyncio.create_task(client.get("/sleep/0.5"))  # round robin: to `a`
            await asyncio.to_thread(wait_until, lambda: pool.backends[0].in_flight == 1)
            drained = await client.post("/lb-admin/backends/drain", params={"url": a.url})
            assert drained.status_code == 200
            assert drained.json() == {"url": a.url, "state": "draining", "in_flight": 1}
            assert {(await client.get("/")).headers["x-backend"] for _ in range(6)} == {"b"}
            assert (await slow).status_code == 200  # the in-flight one finished normally
            document = (await client.get("/lb-metrics")).json()
            assert [x["state"] for x in document["backends"]] == [DRAINING, HEALTHY]
            samples = Samples(server.app.state.metrics.collect())
            assert samples.total("lb_backend_state", backend=a.url, state="draining") == 1
            assert samples.total("lb_backend_up", backend=a.url) == 0
            undrained = await client.post("/lb-admin/backends/undrain", params={"url": a.url + "/"})
            assert undrained.json()["state"] == HEALTHY
            assert {(await client.get("/")).headers["x-backend"] for _ in range(6)} == {"a", "b"}
            # Eject and return by hand; unknown backends and actions are 404s.
            assert (await client.post("/lb-admin/backends/eject", params={"url": b.url})).json()[
                "state"
            ] == EJECTED
            refused = await client.post("/lb-admin/backends/eject", params={"url": a.url})
            assert refused.status_code == 409  # a second one would exceed 50% of the pool
            assert (await client.post("/lb-admin/backends/uneject", params={"url": b.url})).json()[
                "state"
            ] == HEALTHY
            assert (
                await client.post("/lb-admin/backends/drain", params={"url": "http://x:1"})
            ).status_code == 404
            assert (await client.post("/lb-admin/backends/reboot", params={"url": a.url})).status_code == 404


def test_admin_writes_only_from_allowed_networks(echo_backends: list[EchoBackend]) -> None:
    with run_lb([echo_backends[0].url], admin_write_allow=["10.0.0.0/8"]) as server:
        response = httpx.post(server.url + "/lb-admin/backends/drain", params={"url": echo_backends[0].url})
        assert response.status_code == 403
        assert server.app.state.clusters.default.pool.backends[0].state == HEALTHY


def test_panic_mode_unit() -> None:
    pool = pool_of(4, panic_threshold=50)
    for backend in pool.backends[:2]:
        mark_down(pool, backend)
    assert not pool.panic and pool.eligible == tuple(pool.backends[2:])  # 50% healthy: not below
    backend = pool.backends[2]
    mark_down(pool, backend)
    assert pool.panic and pool.eligible == tuple(pool.backends)  # 25% < 50%: all of them
    pool.drain(pool.backends[0])
    assert pool.eligible == tuple(pool.backends[1:])  # draining stays out even in panic
    off = pool_of(2)
    for backend in off.backends:
        mark_down(off, backend)
    assert off.eligible == () and not off.panic


@pytest.mark.parametrize("panic", [0, 50])
def test_panic_mode_sends_to_unhealthy_backends_rather_than_503(echo_factory: Any, panic: int) -> None:
    a: EchoBackend = echo_factory("a")
    b: EchoBackend = echo_factory("b")
    # Both fail their checks (the path answers 500) but would serve real requests.
    with run_lb(
        [a.url, b.url], health_path="/status/500", health_interval=0.05, panic_threshold=panic
    ) as server:
        pool = server.app.state.clusters.default.pool
        wait_until(lambda: all(x.state == UNHEALTHY for x in pool.backends), timeout=10)
        response = httpx.get(server.url + "/")
    if panic:
        assert pool.panic and response.status_code == 200
    else:
        assert response.status_code == 503
        assert response.json() == {"error": "all backends are down"}


def test_slow_start_ramps_the_effective_weight() -> None:
    clock = FakeClock()
    pool = pool_of(2, slow_start=10.0, clock=clock)
    backend = pool.backends[0]
    assert backend.effective_weight() == 2  # healthy from the start: no ramp
    pool.record_check(backend, False)
    pool.record_check(backend, False)
    assert backend.state == UNHEALTHY
    pool.record_check(backend, True)
    pool.record_check(backend, True)
    assert backend.state == HEALTHY
    assert backend.effective_weight() == pytest.approx(0.2)  # 10% of 2
    clock.now += 5
    assert backend.effective_weight() == pytest.approx(1.1)  # halfway: 55%
    # The weighted policies see the ramp: at 55% vs 100%, 11 of 31 picks.
    policy = WeightedRoundRobin()
    chosen = [policy.pick(pool.eligible, REQUEST) for _ in range(310)]
    assert chosen.count(backend) == pytest.approx(110, abs=2)
    backend.in_flight, pool.backends[1].in_flight = 1, 2
    # least_conn: (1+1)/1.1 = 1.8 vs (2+1)/2 = 1.5: the ramping one counts as busier.
    assert LeastConn().pick(pool.eligible, REQUEST) is pool.backends[1]
    clock.now += 5
    assert backend.effective_weight() == 2 and backend.ramp_until == 0.0  # done, and free again


def test_slow_start_off_by_default_and_after_ejection() -> None:
    clock = FakeClock()
    off = pool_of(2, clock=clock, outlier_failures=1)
    off.record_failure(off.backends[0], "status 503")
    off.expire_ejections(clock.now + 31)
    assert off.backends[0].state == HEALTHY and off.backends[0].ramp_until == 0.0
    on = pool_of(2, clock=clock, outlier_failures=1, slow_start=4.0)
    on.record_failure(on.backends[0], "status 503")
    assert on.backends[0].state == EJECTED
    clock.now += 30
    on.expire_ejections()
    assert on.backends[0].effective_weight() == pytest.approx(0.2)


def test_every_transition_is_logged_once_with_backend_and_reason(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    clock = FakeClock()
    pool = pool_of(2, clock=clock, outlier_failures=2)
    backend = pool.backends[0]
    with caplog.at_level(logging.INFO, logger="lbapp.pool"):
        pool.record_check(backend, False, "status 500")
        pool.record_check(backend, False, "status 500")
        pool.record_check(backend, False, "status 500")  # already unhealthy: nothing new
        pool.record_check(backend, True)
        pool.record_check(backend, True)
        pool.record_failure(backend, "status 503")
        pool.record_failure(backend, "status 503")
        pool.expire_ejections(clock.now + 60)
        pool.drain(backend)
        pool.undrain(backend)
    records = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "lbapp.pool"]
    assert [level for level, _ in records] == ["WARNING", "INFO", "WARNING", "INFO", "WARNING", "INFO"]
    assert all(backend.url in message for _, message in records)
    assert "unhealthy, was healthy (2 checks failed: status 500)" in records[0][1]
    assert "ejected, was healthy (2 failed requests in a row, last: status 503" in records[2][1]
    assert "healthy, was ejected (ejection time over)" in records[3][1]
    assert "draining, was healthy (drained through the admin API)" in records[4][1]
    assert backend.transitions == 6
