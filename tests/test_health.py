"""Active health checks: rise/fall thresholds, a loop that never dies."""

from __future__ import annotations

from typing import Any

import httpx

from lbapp.pool import HEALTHY, UNHEALTHY, Pool
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
    with run_lb([good.url, bad.url], health_interval=0.1, health_timeout=1) as server:
        pool = server.app.state.pool
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
    with run_lb([victim.url], health_interval=0.1, health_timeout=0.5) as server:
        backend = server.app.state.pool.backends[0]
        victim.kill()
        wait_until(lambda: backend.state == UNHEALTHY, timeout=10)
        assert httpx.get(server.url + "/").status_code == 503


def test_health_loop_survives_an_exception(echo_backends: list[EchoBackend], monkeypatch: Any) -> None:
    with run_lb([echo_backends[0].url], health_interval=0.05) as server:
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
