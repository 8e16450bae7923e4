"""Metrics: /metrics and /lb-metrics after a known sequence, promtool, and the pieces they use."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import respx
from prometheus_client.parser import text_string_to_metric_families

from lbapp import create_app
from lbapp.metrics import BUCKETS, Histogram, code_class, error_kind
from lbapp.views import quantile

from .conftest import EchoBackend, make_settings, run_lb, wait_until

A, B = "http://backend-a.test", "http://backend-b.test"


def needs(binary: str) -> str:
    """The binary's path; skips when it is missing, except under CI, where that is a failure."""
    path = shutil.which(binary)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{binary} is required under CI (.ci/run installs it)")
        pytest.skip(f"{binary} not installed (apt-get install it; CI=true makes this a failure)")
    return path


def prometheus_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **match: str) -> float:
    return sum(
        value
        for (sample, labels), value in samples.items()
        if sample == name and set(match.items()) <= set(labels)
    )


@contextlib.asynccontextmanager
async def lb_client(**overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings([A, B], transport="httpcore", health_path="/health", **overrides)
    app = create_app(settings)  # respx mocks httpcore (and the HTTP health checks)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://lb.test") as client:
            yield client


async def test_both_views_after_a_known_sequence_of_requests_failures_and_retries() -> None:
    with respx.mock(assert_all_called=False) as mock:
        mock.get(path="/health").respond(200)
        for base in (A, B):
            mock.get(f"{base}/ok").respond(200, text="fine")
            mock.post(f"{base}/ok").respond(200, text="posted")
            mock.get(f"{base}/down").mock(side_effect=httpx.ConnectError("refused"))
            mock.get(f"{base}/slow").mock(side_effect=httpx.ReadTimeout("slow"))
            mock.get(f"{base}/err").respond(500, text="backend error")
        async with lb_client(max_retries=1, health_interval=60) as client:
            for _ in range(200):  # the first health-check round (at start-up) has run
                if all(b["last_checked"] for b in (await client.get("/lb-metrics")).json()["backends"]):
                    break
                await asyncio.sleep(0.01)
            for _ in range(4):
                assert (await client.get("/ok")).status_code == 200
            assert (await client.post("/ok", content=b"hello")).status_code == 200
            assert (await client.get("/down")).status_code == 502  # both tried: 1 retry
            assert (await client.get("/slow")).status_code == 504  # timeouts are not retried
            assert (await client.get("/err")).status_code == 500  # the backend's own answer
            document = (await client.get("/lb-metrics")).json()
            text = (await client.get("/metrics")).text

    # /lb-metrics: every field of the schema, with its type and value.
    assert list(document) == [
        "uptime_seconds",
        "total_requests",
        "success_requests",
        "failed_requests",
        "retry_attempts",
        "avg_latency_ms",
        "healthy_backends",
        "total_backends",
        "backends",
    ]
    assert isinstance(document["uptime_seconds"], float) and 0 < document["uptime_seconds"] < 60
    assert document["total_requests"] == 8
    assert document["success_requests"] == 6
    assert document["failed_requests"] == 2
    assert document["retry_attempts"] == 1
    assert isinstance(document["avg_latency_ms"], float) and document["avg_latency_ms"] > 0
    assert (document["healthy_backends"], document["total_backends"]) == (2, 2)
    backends = document["backends"]
    assert [b["url"] for b in backends] == [A, B]
    for b in backends:
        assert list(b) == [
            "url",
            "state",
            "active_connections",
            "total_requests",
            "total_failures",
            "last_checked",
        ]
        assert b["state"] == "healthy" and b["active_connections"] == 0
        assert isinstance(b["total_requests"], int) and isinstance(b["total_failures"], int)
        assert isinstance(b["last_checked"], str) and b["last_checked"].endswith("Z")
    # 4 + 1 + 2 (down: both) + 1 (slow) + 1 (err) attempts, of which 3 failed.
    assert sum(b["total_requests"] for b in backends) == 9
    assert sum(b["total_failures"] for b in backends) == 3

    # /metrics: the same numbers.
    s = prometheus_samples(text)
    assert total(s, "lb_requests_received_total") == 8
    assert total(s, "lb_requests_total") == 8
    assert total(s, "lb_requests_total", code="2xx") == 5
    assert total(s, "lb_requests_total", code="5xx") == 3
    assert total(s, "lb_requests_total", method="POST") == 1
    assert total(s, "lb_backend_responses_total") == 6
    assert total(s, "lb_error_responses_total", code="502") == 1
    assert total(s, "lb_error_responses_total", code="504") == 1
    assert total(s, "lb_retries_total", reason="connect") == 1
    assert total(s, "lb_retries_total") == 1
    assert total(s, "lb_upstream_errors_total", kind="connect") == 2
    assert total(s, "lb_upstream_errors_total", kind="timeout") == 1
    assert total(s, "lb_request_bytes_total") == 5
    assert total(s, "lb_response_bytes_total") > 0
    assert total(s, "lb_request_duration_seconds_count") == 8
    assert total(s, "lb_requests_in_flight") == 0
    assert total(s, "lb_health_checks_total", result="pass") == 2
    assert total(s, "lb_build_info", version="0.1.0") == 1
    assert total(s, "process_cpu_seconds_total") > 0
    latency = total(s, "lb_request_duration_seconds_sum") / total(s, "lb_request_duration_seconds_count")
    assert document["avg_latency_ms"] == pytest.approx(latency * 1000, abs=0.001)
    for b in backends:
        url = b["url"]
        assert total(s, "lb_backend_requests_total", backend=url) == b["total_requests"]
        assert total(s, "lb_backend_failures_total", backend=url) == b["total_failures"]
        assert total(s, "lb_upstream_errors_total", backend=url) == b["total_failures"]
        assert total(s, "lb_backend_in_flight", backend=url) == 0
        assert total(s, "lb_backend_up", backend=url) == 1
        assert total(s, "lb_backend_state", backend=url, state="healthy") == 1
        assert total(s, "lb_backend_state", backend=url, state="unhealthy") == 0
    for name in ("lb_outlier_ejections_total", "lb_rate_limited_total", "lb_config_reloads_total"):
        assert any(key[0] == name for key in s) and total(s, name) == 0  # exported before they exist


def test_metrics_pass_promtool(echo_backends: list[EchoBackend]) -> None:
    promtool = needs("promtool")
    with run_lb([echo_backends[0].url, "http://127.0.0.1:1"], max_retries=1) as server:
        for _ in range(4):
            httpx.get(server.url + "/x")
        httpx.post(server.url + "/x", content=b"body")
        text = httpx.get(server.url + "/metrics").text
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (result.stdout + result.stderr).strip() == ""  # not even a lint warning


def test_unhealthy_backend_shows_in_both_views(echo_factory: Any) -> None:
    good = echo_factory("good")
    bad = echo_factory("bad", "--fail")
    with run_lb(
        [good.url, bad.url], health_path="/health", health_interval=0.05, unhealthy_threshold=1
    ) as server:
        wait_until(lambda: httpx.get(server.url + "/lb-metrics").json()["healthy_backends"] == 1)
        document = httpx.get(server.url + "/lb-metrics").json()
        s = prometheus_samples(httpx.get(server.url + "/metrics").text)
    assert [b["state"] for b in document["backends"]] == ["healthy", "unhealthy"]
    assert total(s, "lb_backend_up", backend=bad.url) == 0
    assert total(s, "lb_backend_state", backend=bad.url, state="unhealthy") == 1
    assert total(s, "lb_health_checks_total", backend=bad.url, result="fail") >= 1


def test_histogram_buckets_count_values_up_to_their_bound() -> None:
    h = Histogram()
    for value in (0.0005, 0.001, 0.0011, 10.0, 11.0):
        h.observe(value)
    assert h.counts[0] == 2  # le=0.001 holds 0.0005 and 0.001 itself
    assert h.counts[1] == 1
    assert h.counts[len(BUCKETS) - 1] == 1  # le=10
    assert h.counts[-1] == 1  # +Inf
    assert h.sum == pytest.approx(21.0026)


def test_quantile_interpolates_like_promql() -> None:
    bounds = (0.1, 0.2, 0.4)
    assert quantile(0.5, bounds, (0, 10, 10, 10)) == pytest.approx(0.15)
    assert quantile(0.5, bounds, (10, 10, 10, 10)) == pytest.approx(0.05)
    assert quantile(0.99, bounds, (0, 0, 0, 10)) == 0.4  # in +Inf: the highest finite bound
    assert quantile(0.5, bounds, (0, 0, 0, 0)) is None


def test_labels_are_bounded() -> None:
    assert [code_class(s) for s in (101, 200, 302, 404, 499, 503, 0, 700)] == [
        "1xx",
        "2xx",
        "3xx",
        "4xx",
        "4xx",
        "5xx",
        "5xx",
        "5xx",
    ]
    request = httpx.Request("GET", "http://x")
    assert error_kind(httpx.ConnectError("x", request=request)) == "connect"
    assert error_kind(httpx.ConnectTimeout("x", request=request)) == "timeout"
    assert error_kind(httpx.ReadTimeout("x", request=request)) == "timeout"
    assert error_kind(httpx.ReadError("x", request=request)) == "reset"
    assert error_kind(httpx.RemoteProtocolError("x", request=request)) == "protocol"


def test_unknown_methods_share_one_label(echo_backends: list[EchoBackend]) -> None:
    with run_lb([echo_backends[0].url]) as server:
        for method in ("PROPFIND", "MKCOL", "GET"):
            httpx.request(method, server.url + "/m")
        s = prometheus_samples(httpx.get(server.url + "/metrics").text)
    assert total(s, "lb_requests_total", method="OTHER") == 2
    assert total(s, "lb_requests_total", method="GET") == 1
    assert not any("PROPFIND" in str(key) for key in s)
