"""X-Request-ID, the access log (text and JSON), admin paths and LB_ADMIN_ALLOW."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import httpx

from lbapp.logs import JsonFormatter, TextFormatter
from lbapp.requestid import ensure_request_id, is_sane

from .conftest import EchoBackend, LBProcess, run_lb, wait_until


def test_a_sane_request_id_is_kept_passed_on_and_returned(echo_backends: list[EchoBackend]) -> None:
    with run_lb([echo_backends[0].url]) as server:
        response = httpx.get(server.url + "/id", headers={"X-Request-ID": "client-id-42"})
    assert response.headers["x-request-id"] == "client-id-42"
    assert response.json()["headers"]["x-request-id"] == "client-id-42"


def test_a_missing_or_insane_request_id_is_replaced(echo_backends: list[EchoBackend]) -> None:
    with run_lb([echo_backends[0].url]) as server, httpx.Client(base_url=server.url) as client:
        generated = client.get("/id")
        insane = client.get("/id", headers={"X-Request-ID": "a b<script>"})
        too_long = client.get("/id", headers={"X-Request-ID": "x" * 129})
        twice = client.get("/id", headers=[("X-Request-ID", "one"), ("X-Request-ID", "two")])
    ids = set()
    for response in (generated, insane, too_long, twice):
        request_id = response.headers["x-request-id"]
        assert len(request_id) == 32 and int(request_id, 16) >= 0
        sent = [v for n, v in response.json()["header_list"] if n == "x-request-id"]
        assert sent == [request_id]
        ids.add(request_id)
    assert len(ids) == 4


def test_the_load_balancers_own_errors_carry_the_request_id() -> None:
    with run_lb(["http://127.0.0.1:1"], max_retries=0) as server:
        response = httpx.get(server.url + "/x", headers={"X-Request-ID": "err-1"})
    assert response.status_code == 502
    assert response.headers.get_list("x-request-id") == ["err-1"]


def test_request_id_rules() -> None:
    assert is_sane(b"0f8fad5b-d9cb-469f-a165-70867728950e")
    assert is_sane(b"Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=1") is False
    assert not is_sane(b"") and not is_sane(b"x" * 129) and not is_sane(b"a\nb")
    scope: dict[str, Any] = {"headers": [(b"host", b"h"), (b"X-Request-ID", b"keep-me")]}
    assert ensure_request_id(scope) == b"keep-me"
    assert scope["headers"] == [(b"host", b"h"), (b"X-Request-ID", b"keep-me")]


def record(**access: Any) -> logging.LogRecord:
    entry = logging.LogRecord("lbapp.access", logging.INFO, __file__, 1, "access", None, None)
    entry.created = 1775210400.25
    entry.access = {  # type: ignore[attr-defined]
        "request_id": "rid",
        "client": "10.0.0.9",
        "method": "GET",
        "path": "/a",
        "status": 200,
        "backend": "http://b:1",
        "attempts": 1,
        "upstream_ms": 1.25,
        "total_ms": 2.5,
        "bytes_in": 0,
        "bytes_out": 12,
        **access,
    }
    return entry


def test_access_log_formats() -> None:
    line = TextFormatter().format(record())
    assert line == (
        '2026-04-03T10:00:00.250Z 10.0.0.9 "GET /a" 200 backend=http://b:1 attempts=1 upstream=1.2ms'
        " total=2.5ms in=0 out=12 id=rid"
    )
    document = json.loads(JsonFormatter().format(record(backend=None, upstream_ms=None)))
    assert document == {
        "time": "2026-04-03T10:00:00.250Z",
        "level": "info",
        "logger": "lbapp.access",
        "request_id": "rid",
        "client": "10.0.0.9",
        "method": "GET",
        "path": "/a",
        "status": 200,
        "backend": None,
        "attempts": 1,
        "upstream_ms": None,
        "total_ms": 2.5,
        "bytes_in": 0,
        "bytes_out": 12,
    }


def test_json_access_log_line_per_proxied_request(echo_backends: list[EchoBackend], tmp_path: Path) -> None:
    log = tmp_path / "stderr.log"
    with log.open("wb") as stderr:
        lb = LBProcess(
            {"LB_BACKENDS": echo_backends[0].url, "LB_LOG_FORMAT": "json", "LB_HEALTH_INTERVAL": "60"},
            "--log-level",
            "info",
            stderr=stderr,
        )
        try:
            httpx.post(lb.url + "/logged?q=secret", content=b"abc", headers={"X-Request-ID": "log-1"})
            httpx.get(lb.url + "/lb-metrics")  # admin endpoints are not access-logged

            def access_lines() -> list[dict[str, Any]]:
                lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
                return [x for x in lines if x["logger"] == "lbapp.access"]

            entries = wait_until(access_lines, timeout=10)
        finally:
            lb.stop()
    assert len(entries) == 1
    entry = entries[0]
    assert entry["request_id"] == "log-1"
    assert (entry["client"], entry["method"], entry["path"], entry["status"]) == (
        "127.0.0.1",
        "POST",
        "/logged",
        200,
    )
    assert entry["backend"] == echo_backends[0].url and entry["attempts"] == 1
    assert entry["bytes_in"] == 3 and entry["bytes_out"] > 0
    assert 0 < entry["upstream_ms"] <= entry["total_ms"]
    assert entry["time"].endswith("Z")


def test_admin_paths_can_move_and_be_turned_off(echo_backends: list[EchoBackend]) -> None:
    with run_lb(
        [echo_backends[0].url], metrics_path="/_lb/metrics", json_metrics_path="/_lb/json", status_path=""
    ) as server:
        assert httpx.get(server.url + "/_lb/metrics").text.startswith("# HELP")
        assert "total_requests" in httpx.get(server.url + "/_lb/json").json()
        # The old paths are now the backend's.
        for path in ("/metrics", "/lb-metrics", "/lb-status"):
            assert httpx.get(server.url + path).json()["server"] == "backend-1"


def test_admin_allow_restricts_admin_endpoints_not_probes(echo_backends: list[EchoBackend]) -> None:
    with run_lb([echo_backends[0].url], admin_allow=["10.0.0.0/8"]) as server:
        for path in ("/metrics", "/lb-metrics", "/lb-status", "/lb-status?format=json"):
            response = httpx.get(server.url + path)
            assert response.status_code == 403, path
            assert response.json() == {"error": "forbidden"}
        # X-Forwarded-For is not believed for this decision.
        assert httpx.get(server.url + "/metrics", headers={"X-Forwarded-For": "10.1.1.1"}).status_code == 403
        assert httpx.get(server.url + "/lb-health").status_code == 200
        assert httpx.get(server.url + "/lb-ready").status_code == 200
        assert httpx.get(server.url + "/x").status_code == 200
    with run_lb([echo_backends[0].url], admin_allow=["127.0.0.1/32"]) as server:
        assert httpx.get(server.url + "/metrics").status_code == 200
