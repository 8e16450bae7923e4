"""Passive outlier detection: real traffic ejects a failing backend for a while, never too many."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from lbapp.backend import EJECTED, HEALTHY, UNHEALTHY
from lbapp.pool import Pool
from lbapp.settings import BackendSpec
from lbapp.views import Samples

from .conftest import EchoBackend, run_lb, wait_until


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_pool(count: int, clock: FakeClock, **options: Any) -> Pool:
    values: dict[str, Any] = {"outlier_failures": 3, "ejection_time": 10.0, "max_ejection_time": 35.0}
    values.update(options)
    return Pool([BackendSpec(url=f"http://b{i}:80") for i in range(count)], clock=clock, **values)


def test_consecutive_failures_eject_and_a_success_resets_the_count() -> None:
    clock = FakeClock()
    pool = make_pool(2, clock)
    backend = pool.backends[0]
    pool.record_failure(backend, "status 503")
    pool.record_failure(backend, "status 503")
    backend.errors_in_row = 0  # what the proxy does on a good answer
    pool.record_failure(backend, "status 503")
    pool.record_failure(backend, "status 503")
    assert backend.state == HEALTHY
    pool.record_failure(backend, "ConnectError")
    assert backend.state == EJECTED and backend.ejections == 1
    assert pool.eligible == (pool.backends[1],)
    assert backend.ejected_until == clock.now + 10.0


def test_ejection_time_doubles_up_to_the_cap_and_the_backend_returns() -> None:
    clock = FakeClock()
    pool = make_pool(2, clock)
    backend = pool.backends[0]
    durations = []
    for _ in range(4):
        for _ in range(3):
            pool.record_failure(backend, "status 502")
        assert backend.state == EJECTED
        durations.append(backend.ejected_until - clock.now)
        clock.now += durations[-1] - 0.01
        pool.expire_ejections()
        assert backend.state == EJECTED  # not a moment early
        clock.now += 0.02
        pool.expire_ejections()
        assert backend.state == HEALTHY and backend in pool.eligible
    assert durations == pytest.approx([10.0, 20.0, 35.0, 35.0])
    assert backend.ejections == 4 and backend.transitions == 8
    # Well-behaved for longer than the maximum ejection time: the next ejection is short again.
    clock.now += 36.0
    for _ in range(3):
        pool.record_failure(backend, "status 502")
    assert backend.ejected_until - clock.now == pytest.approx(10.0)


def test_at_most_max_ejection_percent_of_the_pool_is_ejected() -> None:
    clock = FakeClock()
    pool = make_pool(4, clock, max_ejection_percent=50)
    for backend in pool.backends:
        for _ in range(3):
            pool.record_failure(backend, "status 503")
    assert [b.state for b in pool.backends] == [EJECTED, EJECTED, HEALTHY, HEALTHY]
    clock.now += 10.0
    pool.expire_ejections()
    for _ in range(3):
        pool.record_failure(pool.backends[3], "status 503")
    assert pool.backends[3].state == EJECTED  # room again once the first ones returned

    single = make_pool(1, clock, max_ejection_percent=50)
    for _ in range(10):
        single.record_failure(single.backends[0], "status 503")
    assert single.backends[0].state == HEALTHY  # ejecting the only backend would be 100%


def test_outlier_detection_off_never_ejects() -> None:
    pool = make_pool(2, FakeClock(), outlier_failures=0)
    for _ in range(50):
        pool.record_failure(pool.backends[0], "status 503")
    assert pool.backends[0].state == HEALTHY


def test_recovery_proven_by_active_checks_ends_an_ejection() -> None:
    clock = FakeClock()
    pool = make_pool(2, clock)
    backend = pool.backends[0]
    for _ in range(3):
        pool.record_failure(backend, "ConnectError")
    pool.record_check(backend, False)
    pool.record_check(backend, False)
    assert backend.state == UNHEALTHY
    pool.record_check(backend, True)
    pool.record_check(backend, True)
    assert backend.state == HEALTHY and not backend.ejected_until


def test_failing_backend_is_ejected_by_real_traffic_and_returns(echo_factory: Any) -> None:
    good: EchoBackend = echo_factory("good")
    bad: EchoBackend = echo_factory("bad", "--fail")
    with (
        run_lb(
            [good.url, bad.url],
            outlier_consecutive_failures=3,
            outlier_statuses="500-599",
            outlier_ejection_time=0.5,
            outlier_max_ejection_time=5,
        ) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        backend = server.app.state.clusters.default.pool.backends[1]
        assert backend.state == HEALTHY  # one failed active check (fall is 2; the next is in 60 s)
        servers = [client.get("/").headers.get("x-backend") for _ in range(6)]
        assert servers.count("bad") == 3
        assert backend.state == EJECTED
        ejected_at = time.monotonic()
        document = client.get("/lb-metrics").json()
        assert document["backends"][1]["state"] == "ejected"
        samples = Samples(server.app.state.metrics.collect())
        assert samples.total("lb_outlier_ejections_total", backend=bad.url) == 1
        assert samples.total("lb_backend_state", backend=bad.url, state="ejected") == 1
        assert {client.get("/").headers.get("x-backend") for _ in range(6)} == {"good"}
        wait_until(lambda: backend.state == HEALTHY, timeout=5)
        # Not before the ejection time (a lower bound a slow machine cannot break).
        assert time.monotonic() - ejected_at >= 0.4
        # Back in rotation; three more failures eject it again, for twice as long.
        servers = [client.get("/").headers.get("x-backend") for _ in range(6)]
        assert servers.count("bad") == 3
        assert backend.state == EJECTED and backend.ejections == 2
        assert 0.9 <= backend.ejected_until - time.monotonic() <= 1.0
