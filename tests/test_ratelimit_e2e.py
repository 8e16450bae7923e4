"""Rate limiting end to end: a real lbapp (threads, subprocesses, two workers, two instances)
in front of echo backends, with a real redis-server where buckets are shared."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import EchoBackend, LauncherProcess, LBProcess, RedisServer, run_lb, wait_until
from .test_metrics import prometheus_samples, total
from .test_multiprocess import requests_per_worker

POLICY = "ratelimit-policy"


def statuses(url: str, count: int, **kwargs: Any) -> list[int]:
    with httpx.Client(timeout=10) as client:
        return [client.get(url, **kwargs).status_code for _ in range(count)]


def backend_requests(lb_url: str) -> int:
    return sum(b["total_requests"] for b in httpx.get(lb_url + "/lb-metrics").json()["backends"])


def test_exact_burst_headers_and_no_backend_cost(echo_backends: list[EchoBackend]) -> None:
    with run_lb([echo_backends[0].url], rate_limit="5/h") as lb, httpx.Client() as client:
        answers = [client.get(f"{lb.url}/x/{i}") for i in range(12)]
        assert [r.status_code for r in answers] == [200] * 5 + [429] * 7
        for i, allowed in enumerate(answers[:5]):
            assert allowed.headers[POLICY] == '"default";q=5;w=3600'
            # One token every 720 s: after the (i+1)th request the bucket is full in 720 * (i+1) s.
            remaining, reset = allowed.headers["ratelimit"].removeprefix('"default";').split(";")
            assert remaining == f"r={4 - i}"
            assert 720 * (i + 1) - 2 <= int(reset.removeprefix("t=")) <= 720 * (i + 1)
            assert allowed.json()["path"] == f"/x/{i}"  # the echo backend answered
        refused = answers[5]
        assert refused.json() == {"error": "rate limited"}
        assert refused.headers["content-type"] == "application/json"
        assert refused.headers[POLICY] == '"default";q=5;w=3600'
        retry_after = int(refused.headers["retry-after"])
        assert 718 <= retry_after <= 720  # when the next token is there (s), at least 1
        assert refused.headers["ratelimit"] == f'"default";r=0;t={retry_after}'
        assert refused.headers["x-request-id"]
        assert backend_requests(lb.url) == 5  # a refused request cost no backend anything
        samples = prometheus_samples(client.get(lb.url + "/metrics").text)
        assert total(samples, "lb_rate_limited_total", route="/") == 7
        assert total(samples, "lb_rate_limit_errors_total") == 0
        assert total(samples, "lb_requests_total", backend="none", code="4xx") == 7
        assert client.get(lb.url + "/lb-health").status_code == 200  # admin paths are not limited


def test_refill_over_time(echo_backends: list[EchoBackend]) -> None:
    """A token a second: refused after the burst, allowed again a second later, one at a time."""
    with run_lb([echo_backends[0].url], rate_limit="1/s", rate_limit_burst=2) as lb, httpx.Client() as c:
        began = time.monotonic()
        assert [c.get(lb.url).status_code for _ in range(3)] == [200, 200, 429]
        assert time.monotonic() - began < 1  # (else a token came back in between: the test is moot)
        wait_until(lambda: c.get(lb.url).status_code == 200, timeout=5)
        assert c.get(lb.url).status_code == 429  # one token came back, not a new burst


def test_header_key_falls_back_to_the_address(echo_backends: list[EchoBackend]) -> None:
    with run_lb([echo_backends[0].url], rate_limit="2/h", rate_limit_key="header:X-API-Key") as lb:
        assert statuses(lb.url, 3, headers={"X-API-Key": "alpha"}) == [200, 200, 429]
        assert statuses(lb.url, 3, headers={"X-API-Key": "beta"}) == [200, 200, 429]
        assert statuses(lb.url, 3) == [200, 200, 429]  # no key: limited by its address
        assert statuses(lb.url, 1, headers={"X-API-Key": "gamma"}) == [200]


def test_ipv6_clients_share_their_64(echo_backends: list[EchoBackend]) -> None:
    with run_lb([echo_backends[0].url], rate_limit="2/h", trusted_proxies=["127.0.0.1"]) as lb:

        def from_(address: str, count: int) -> list[int]:
            return statuses(lb.url, count, headers={"X-Forwarded-For": address})

        assert from_("2001:db8:1:2::1", 1) == [200]
        assert from_("2001:db8:1:2:ffff::99", 2) == [200, 429]  # same /64: one bucket
        assert from_("2001:db8:1:3::1", 2) == [200, 200]  # the next /64: its own
        assert from_("198.51.100.7", 3) == [200, 200, 429]


def test_per_route_limits(echo_backends: list[EchoBackend]) -> None:
    routes = [
        {"prefix": "/api", "backends": [echo_backends[1].url], "rate_limit": "2/h"},
        {"prefix": "/bulk", "backends": [echo_backends[1].url], "rate_limit_burst": 4},
        {"prefix": "/free", "backends": [echo_backends[2].url], "rate_limit": "off"},
    ]
    with run_lb([echo_backends[0].url], rate_limit="3/h", routes=routes) as lb, httpx.Client() as c:
        assert statuses(lb.url + "/api/a", 3) == [200, 200, 429]
        assert statuses(lb.url + "/other", 4) == [200, 200, 200, 429]  # the default route's own
        assert statuses(lb.url + "/bulk", 5) == [200] * 4 + [429]  # global rate, its own burst
        free = c.get(lb.url + "/free/x")
        assert statuses(lb.url + "/free/x", 20) == [200] * 20
        assert POLICY not in free.headers and "ratelimit" not in free.headers
        assert c.get(lb.url + "/api/b").headers[POLICY] == '"default";q=2;w=3600'
        samples = prometheus_samples(c.get(lb.url + "/metrics").text)
        assert total(samples, "lb_rate_limited_total", route="/api") == 2  # incl. /api/b just now
        assert total(samples, "lb_rate_limited_total", route="/") == 1
        assert total(samples, "lb_rate_limited_total", route="/bulk") == 1


def test_two_instances_share_one_limit_through_redis(
    echo_backends: list[EchoBackend], redis_server: RedisServer
) -> None:
    env = {
        "LB_BACKENDS": echo_backends[0].url,
        "LB_HEALTH_INTERVAL": "60",
        "LB_ACCESS_LOG": "false",
        "LB_RATE_LIMIT": "10/h",
        "LB_RATE_LIMIT_REDIS_URL": redis_server.url,
        "LB_RATE_LIMIT_REDIS_TIMEOUT": "2s",  # a busy CI machine must not turn this into fail-open
    }
    instances = [LBProcess(env), LBProcess(env)]
    try:
        results = {lb.url: statuses(lb.url, 8) for lb in instances}
        allowed = {url: codes.count(200) for url, codes in results.items()}
        assert sum(allowed.values()) == 10, results  # one limit, not one per instance
        assert all(codes.count(200) + codes.count(429) == 8 for codes in results.values())
        assert list(allowed.values()) == [8, 2]
    finally:
        for lb in instances:
            lb.stop()


@pytest.mark.parametrize("how", ["metrics_dir", "temp_dir", "launcher"])
def test_two_workers_enforce_one_limit(echo_backends: list[EchoBackend], tmp_path: Path, how: str) -> None:
    """`--workers 2` share one table: in PROMETHEUS_MULTIPROC_DIR, else in a private temp dir; the
    same through the `lbapp` launcher (which makes a metrics directory of its own)."""
    directory = tmp_path / "metrics"
    env = {
        "LB_BACKENDS": echo_backends[0].url,
        "LB_HEALTH_INTERVAL": "60",
        "LB_ACCESS_LOG": "false",
        "LB_RATE_LIMIT": "30/h",
        "TMPDIR": str(tmp_path),
    }
    metrics_dir = how == "metrics_dir"
    if metrics_dir:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    lb = LauncherProcess(env, "--workers", "2") if how == "launcher" else LBProcess(env, "--workers", "2")
    try:
        codes: list[int] = []

        def send(count: int) -> None:
            # No keep-alive: every request is a new connection, which either worker may accept.
            with httpx.Client(limits=httpx.Limits(max_keepalive_connections=0), timeout=10) as client:
                codes.extend(client.get(f"{lb.url}/w").status_code for _ in range(count))

        threads = [threading.Thread(target=send, args=(20,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert len(codes) == 80
        assert codes.count(200) == 30 and codes.count(429) == 50  # not 2 x 30
        if how == "launcher":
            return
        if not metrics_dir:
            private = tmp_path / f"lbapp-{os.getuid()}"
            assert (private / f"lbapp-ratelimit-{lb.proc.pid}.table").exists()
            assert private.stat().st_mode & 0o777 == 0o700
            return
        # Both workers took part (each flushes its counters within a second).
        wait_until(lambda: sum(requests_per_worker(directory).values()) == 80, timeout=10)
        per_worker = requests_per_worker(directory)
        assert len(per_worker) == 2 and all(n > 0 for n in per_worker.values()), per_worker
        assert (directory / "lbapp-ratelimit.table").exists()
    finally:
        lb.stop()


@pytest.mark.parametrize("fail_open", [True, False])
def test_redis_killed_mid_test_then_back(
    echo_backends: list[EchoBackend], redis_server: RedisServer, fail_open: bool
) -> None:
    settings = {
        "rate_limit": "3/h",
        "rate_limit_redis_url": redis_server.url,
        "rate_limit_redis_timeout": 0.5,
        "rate_limit_fail_open": fail_open,
    }
    with run_lb([echo_backends[0].url], **settings) as lb, httpx.Client() as client:
        assert statuses(lb.url, 4) == [200, 200, 200, 429]
        redis_server.kill()
        during = [client.get(lb.url) for _ in range(5)]
        if fail_open:
            assert [r.status_code for r in during] == [200] * 5
            assert "ratelimit" not in during[0].headers  # nothing known but the policy
        else:
            assert [r.status_code for r in during] == [503] * 5
            assert during[0].json() == {"error": "rate limiter unavailable"}
            assert during[0].headers["retry-after"] == "1"
        assert during[0].headers[POLICY] == '"default";q=3;w=3600'
        samples = prometheus_samples(client.get(lb.url + "/metrics").text)
        assert total(samples, "lb_rate_limit_errors_total") == 5
        redis_server.start()  # same port, empty: every bucket full again
        wait_until(lambda: "ratelimit" in client.get(lb.url).headers, timeout=10)
        assert statuses(lb.url, 3)[-1] == 429  # limited again, no restart needed


def test_access_log_says_which_were_limited(echo_backends: list[EchoBackend], tmp_path: Path) -> None:
    log = tmp_path / "stderr.log"
    env = {
        "LB_BACKENDS": echo_backends[0].url,
        "LB_LOG_FORMAT": "json",
        "LB_HEALTH_INTERVAL": "60",
        "LB_RATE_LIMIT": "1/h",
    }
    with log.open("wb") as stderr:
        lb = LBProcess(env, "--log-level", "info", stderr=stderr)
        try:
            assert statuses(lb.url, 2) == [200, 429]

            def access_lines() -> list[dict[str, Any]]:
                lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
                entries = [x for x in lines if x["logger"] == "lbapp.access"]
                return entries if len(entries) == 2 else []

            entries = wait_until(access_lines, timeout=10)
        finally:
            lb.stop()
    assert [(e["status"], e["rate_limit"], e["backend"]) for e in entries] == [
        (200, "pass", echo_backends[0].url),
        (429, "limited", None),
    ]
