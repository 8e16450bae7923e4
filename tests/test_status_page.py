"""The status page: self-contained HTML, its JSON, and a real headless Chromium filling the table."""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import httpx

from .conftest import ROOT, EchoBackend, run_lb
from .test_metrics import needs

ARTIFACTS = Path(ROOT) / "tests" / "artifacts"


def chromium(binary: str, *args: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="lbapp-chromium-") as profile:
        command = [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            *args,
        ]
        return subprocess.run(command, capture_output=True, text=True, timeout=90)


def test_the_page_is_self_contained(echo_backends: list[EchoBackend]) -> None:
    with run_lb([b.url for b in echo_backends]) as server:
        page = httpx.get(server.url + "/lb-status")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    html = page.text
    # Nothing is loaded from elsewhere (the icon is an empty data: URL, so no /favicon.ico either).
    assert not re.search(r"""src\s*=|href\s*=\s*"(?!data:)|@import|url\(|https?://""", html)
    assert "?format=json" in html


def test_the_json_has_window_numbers_per_backend(echo_backends: list[EchoBackend]) -> None:
    urls = [b.url for b in echo_backends]
    with run_lb(urls) as server, httpx.Client(base_url=server.url) as client:
        for _ in range(9):
            client.get("/x")
        client.get("/status/503")
        data = client.get("/lb-status?format=json").json()
    assert [b["url"] for b in data["backends"]] == urls
    assert data["total_requests"] == 10 and data["healthy_backends"] == 3
    assert data["window_seconds"] > 0
    for row in data["backends"]:
        assert row["state"] == "healthy" and row["weight"] == 1 and row["in_flight"] == 0
        assert row["rps"] > 0 and row["p50_ms"] > 0 and row["p99_ms"] >= row["p50_ms"]
    assert sum(row["requests"] for row in data["backends"]) == 10
    error_rates = sorted(row["error_rate"] for row in data["backends"])
    assert error_rates[0] == 0 and error_rates[-1] > 0  # the backend that answered the 503


def test_headless_chromium_fills_the_table_from_live_data(echo_factory: object) -> None:
    binary = needs("chromium")
    good = echo_factory("good")  # type: ignore[operator]
    bad = echo_factory("bad", "--fail")  # type: ignore[operator]
    with run_lb(
        [good.url, bad.url], health_path="/health", health_interval=0.1, unhealthy_threshold=1
    ) as server:
        with httpx.Client(base_url=server.url) as client:
            for _ in range(20):
                client.get("/x")
        url = server.url + "/lb-status"
        dom = chromium(binary, "--virtual-time-budget=5000", "--dump-dom", url)
        assert dom.returncode == 0, dom.stderr[-2000:]
        html = dom.stdout
        assert 'data-filled="1"' in html, html[-3000:]
        rows = re.findall(r"<tr data-url=\"([^\"]+)\" data-route=\"/\">(.*?)</tr>", html, re.S)
        assert [u for u, _ in rows] == [good.url, bad.url]
        assert "healthy" in rows[0][1] and "unhealthy" in rows[1][1]
        assert "backends healthy" in html
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "status-page.png"
        shot.unlink(missing_ok=True)
        result = chromium(
            binary, "--virtual-time-budget=5000", f"--screenshot={shot}", "--window-size=1200,800", url
        )
        assert result.returncode == 0, result.stderr[-2000:]
    assert shot.stat().st_size > 10_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
