"""Active health checks: rise/fall thresholds, a loop that never dies."""

from __future__ import annotations

from typing import Any

import httpx

from lbapp.backend import HEALTHY, UNHEALTHY
from lbapp.pool import Pool
from lbapp.settings import BackendSpec

from .conftest import EchoBackend, run_lb, wait_until


def test_thresholds_prevent_flapping() -> None:
    pool = Pool([BackendSpec(url="http://b:1")], healthy_threshold=2, unhealthy_threshold=2)
    backend = pool.backends[0]
    for ok in (False, True, False, True, False, True):
        pool.record_check(backend, ok)
        assert backend.state == HEALTHY
    pool.record_check(backend, False)
    pool.record_check(backend, False)
    assert backend.state == UNHEALTHY and pool.eligible == ()
    pool.record_check(backend, True)
    assert backend.state == UNHEALTHY
    pool.record_check(backend, True)
    assert backend.state == HEALTHY and pool.eligible == (backend,)


def test_failing_backend_is_taken_out_and_brought_back(echo_factory: Any) -> None:
    good: EchoBackend = echo_factory("good")
    bad: EchoBackend = echo_factory("bad", "--fail")
    with run_lb([good.url, bad.url], health_path="/health", health_interval=0.1, health_timeout=1) as server:
        pool = server.app.state.clusters.default.pool
        flaky = pool.backends[1]
        wait_until(lambda: flaky.state == UNHEALTHY, timeout=10)
        with httpx.Client(base_url=server.url) as client:
            assert {client.get("/").json()["server"] for _ in range(6)} == {"good"}
        bad.stop()
        bad.args = ()
        bad.start()
        wait_until(lambda: flaky.state == HEALTHY, timeout=10)
        with httpx.Client(base_url=server.url) as client:
            assert {client.get("/").json()["server"] for _ in range(6)} == {"good", "bad"}
        assert httpx.get(server.url + "/lb-metrics").json()["backends"][1]["last_checked"] is not None


def test_killed_backend_is_marked_unhealthy(echo_factory: Any) -> None:
    victim: EchoBackend = echo_factory("victim")
    with run_lb([victim.url], health_path="/health", health_interval=0.1, health_timeout=0.5) as server:
        backend = server.app.state.clusters.default.pool.backends[0]
        victim.kill()
        wait_until(lambda: backend.state == UNHEALTHY, timeout=10)
        assert httpx.get(server.url + "/").status_code == 503


def test_health_loop_survives_an_exception(echo_backends: list[EchoBackend], monkeypatch: Any) -> None:
    with run_lb([echo_backends[0].url], health_path="/health", health_interval=0.05) as server:
        health = server.app.state.health
        calls = {"n": 0}
        original = health.run_once

        async def explode_once() -> None:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("boom")
            await original()

        monkeypatch.setattr(health, "run_once", explode_once)
        start = health.rounds
        wait_until(lambda: health.rounds >= start + 3, timeout=10)
        assert calls["n"] >= 3
        assert httpx.get(server.url + "/x").status_code == 200


def test_backend_failing_every_other_check_never_changes_state(echo_factory: Any) -> None:
    flapping: EchoBackend = echo_factory("flapping", "--flap")
    with run_lb([flapping.url], health_path="/health", health_interval=0.03, health_jitter=0) as server:
        backend = server.app.state.clusters.default.pool.backends[0]
        wait_until(lambda: backend.checks_passed >= 8 and backend.checks_failed >= 8, timeout=15)
        assert backend.state == HEALTHY and backend.transitions == 0
        assert abs(backend.checks_passed - backend.checks_failed) <= 1  # really every other one
        assert httpx.get(server.url + "/").status_code == 200


def test_expected_status_list_and_body_substring(echo_factory: Any) -> None:
    echo: EchoBackend = echo_factory("echo")
    cases = [
        ({"health_path": "/status/204"}, HEALTHY),  # the default 200-399
        ({"health_path": "/status/404"}, UNHEALTHY),
        ({"health_path": "/status/204", "health_expected_status": "200"}, UNHEALTHY),
        ({"health_path": "/status/204", "health_expected_status": "200,204"}, HEALTHY),
        ({"health_path": "/status/500", "health_expected_status": "200-299,500"}, HEALTHY),
        ({"health_body": '"ok"'}, HEALTHY),
        ({"health_body": "ready"}, UNHEALTHY),
        ({"health_method": "HEAD", "health_body": ""}, HEALTHY),
    ]
    for overrides, expected in cases:
        settings = {"health_path": "/health", "health_interval": 0.03, "health_jitter": 0,
                    "unhealthy_threshold": 1, **overrides}  # fmt: skip
        with run_lb([echo.url], **settings) as server:
            backend = server.app.state.clusters.default.pool.backends[0]
            wait_until(lambda b=backend: b.checks_passed + b.checks_failed >= 2, timeout=10)
            assert backend.state == expected, overrides


def test_tcp_checks_only_connect(echo_factory: Any) -> None:
    echo: EchoBackend = echo_factory("echo")
    # An HTTP check of /status/500 would fail; a TCP check only connects and closes.
    with run_lb(
        [echo.url], health_type="tcp", health_path="/status/500", health_interval=0.05, health_timeout=0.5
    ) as server:
        backend = server.app.state.clusters.default.pool.backends[0]
        wait_until(lambda: backend.checks_passed >= 3, timeout=10)
        assert backend.state == HEALTHY and backend.checks_failed == 0
        echo.kill()
        wait_until(lambda: backend.state == UNHEALTHY, timeout=10)


def test_unhealthy_backends_are_checked_at_the_faster_interval(echo_factory: Any) -> None:
    bad: EchoBackend = echo_factory("bad", "--fail")
    with run_lb(
        [bad.url],
        health_path="/health",
        health_interval=60,
        health_unhealthy_interval=0.05,
        unhealthy_threshold=1,
    ) as server:
        backend = server.app.state.clusters.default.pool.backends[0]
        # One check a minute while healthy; the first failure makes it unhealthy, then 20 a second.
        wait_until(lambda: backend.checks_failed >= 6, timeout=10)
        assert backend.state == UNHEALTHY


async def test_jitter_spreads_the_interval() -> None:
    from lbapp.health import HealthChecker

    pool = Pool([BackendSpec(url="http://b:1")])
    checker = HealthChecker([pool], interval=10, jitter=0.2)
    intervals = [checker.next_interval(pool.backends[0]) for _ in range(200)]
    assert all(8.0 <= i <= 12.0 for i in intervals)
    assert max(intervals) - min(intervals) > 2.0
    flat = HealthChecker([pool], interval=10, jitter=0)
    assert {flat.next_interval(pool.backends[0]) for _ in range(10)} == {10.0}
