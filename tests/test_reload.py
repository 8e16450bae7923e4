"""Configuration reloads end to end: SIGHUP to a real lbapp process, and LB_CONFIG_WATCH."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from lbapp import create_app, load_settings

from .conftest import ROOT, EchoBackend, LBProcess, ThreadedServer, listening_socket, wait_until
from .test_runtime import SlowReader, by_worker, listing, servers, state_of


def write_config(path: Path, document: dict[str, Any]) -> None:
    """Save the way editors do: a new file renamed over the old one."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(document))
    os.replace(temporary, path)


def reloads(base: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith("lb_config_reloads_total{"):
            found[line.split('"')[1]] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("lb_config_last_reload_timestamp_seconds "):
            found["timestamp"] = float(line.rsplit(" ", 1)[1])
    return found


def backend_requests(base: str, url: str) -> float:
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith("lb_backend_requests_total{") and f'backend="{url}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_sighup_reloads_keeps_state_drains_and_refuses_bad_config(echo_factory: Any, tmp_path: Path) -> None:
    a, b, c = echo_factory("a"), echo_factory("b"), echo_factory("c")
    config = tmp_path / "lbapp.json"
    write_config(config, {"backends": [a.url, b.url], "algorithm": "first"})
    log = (tmp_path / "lb.log").open("w+")
    env = {"LB_CONFIG": str(config), "LB_HEALTH_INTERVAL": "60", "LB_ACCESS_LOG": "false"}
    lb = LBProcess(env, stderr=log)
    try:
        reader = SlowReader(lb.url)  # `first`: a long stream to a
        assert reader.started.wait(15)
        write_config(config, {"backends": [{"url": c.url, "weight": 1}, b.url], "algorithm": "round_robin"})
        httpx.post(lb.url + "/lb-admin/backends/eject", params={"url": b.url})  # b's state must survive
        requests_to_b = backend_requests(lb.url, b.url)
        lb.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: reloads(lb.url).get("success") == 1.0)
        assert reloads(lb.url)["timestamp"] > 0
        assert state_of(lb.url, a.url) == "draining"  # its stream is still running
        assert state_of(lb.url, b.url) == "ejected"  # the same backend, its state kept
        wait_until(lambda: state_of(lb.url, c.url) == "healthy")  # joined after its check
        assert servers(lb.url, 4) == {"c": 4}
        httpx.post(lb.url + "/lb-admin/backends/uneject", params={"url": b.url})
        assert servers(lb.url, 4) == {"b": 2, "c": 2}
        assert backend_requests(lb.url, b.url) == requests_to_b + 2  # counters kept
        reader.finish()  # the stream across the reload completes intact
        wait_until(lambda: state_of(lb.url, a.url) is None)

        before = listing(lb.url)
        write_config(config, {"backends": [{"url": "ftp://nope"}]})
        lb.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: reloads(lb.url).get("error") == 1.0)
        assert [(e["url"], e["weight"]) for e in listing(lb.url)] == [(e["url"], e["weight"]) for e in before]
        assert reloads(lb.url)["success"] == 1.0
        log.seek(0)
        assert "invalid setting LB_BACKENDS[0].url" in log.read()
        assert lb.proc.poll() is None
    finally:
        lb.stop()
        log.close()


@pytest.fixture
def watched_lb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, echo_factory: Any) -> Any:
    a = echo_factory("a")
    config = tmp_path / "lbapp.json"
    write_config(config, {"backends": [a.url]})
    for name, value in {"CONFIG": str(config), "CONFIG_WATCH": "true", "HEALTH_INTERVAL": "60"}.items():
        monkeypatch.setenv(f"LB_{name}", value)
    monkeypatch.setenv("LB_ACCESS_LOG", "false")
    with ThreadedServer(create_app(load_settings())) as server:
        yield server, config, a


def test_saving_the_watched_file_reloads_routes_too(watched_lb: Any, echo_factory: Any) -> None:
    server, config, a = watched_lb
    api = echo_factory("api")
    route = {"prefix": "/api", "backends": [api.url], "strip_prefix": True}
    write_config(config, {"backends": [a.url], "routes": [route]})
    wait_until(lambda: state_of(server.url, api.url) == "healthy")
    assert httpx.get(server.url + "/api/x").json()["server"] == "api"
    assert httpx.get(server.url + "/api/x").json()["path"] == "/x"
    assert httpx.get(server.url + "/other").json()["server"] == "a"
    write_config(config, {"backends": [a.url]})  # the route goes
    wait_until(lambda: state_of(server.url, api.url) is None)
    assert httpx.get(server.url + "/api/x").json()["server"] == "a"
    assert reloads(server.url)["success"] == 2.0
    (config.parent / "unrelated.json").write_text("{}")  # another file in the directory: ignored
    config.write_text('{"backends": [')  # a half-written save: refused, the old one stays
    wait_until(lambda: reloads(server.url).get("error", 0) >= 1.0)
    assert servers(server.url, 2) == {"a": 2}
    assert reloads(server.url)["success"] == 2.0


def test_two_workers_of_the_launcher_reload_in_place(echo_factory: Any, tmp_path: Path) -> None:
    a, b = echo_factory("a"), echo_factory("b")
    config = tmp_path / "lbapp.json"
    write_config(config, {"backends": [a.url]})
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    sock = listening_socket()
    fd = sock.fileno()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LB_")}
    env.update(
        LB_CONFIG=str(config), LB_HEALTH_INTERVAL="60", LB_ACCESS_LOG="false", LB_METRICS_FLUSH_INTERVAL="0.1"
    )
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    # The launcher, whose master forwards SIGHUP to its workers.
    args = ["-m", "lbapp", "--fd", str(fd), "--workers", "2"]
    proc = subprocess.Popen([sys.executable, *args], pass_fds=[fd], cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        wait_until(lambda: _up(base, proc), timeout=30)
        # Both workers serve (their lifespans, which listen for SIGHUP, are done).
        workers = wait_until(lambda: set(by_worker(base)) if len(by_worker(base)) == 2 else None, timeout=30)
        assert set(json.loads((metrics_dir / "lbapp-workers.json").read_text())) == workers
        write_config(config, {"backends": [b.url]})
        proc.send_signal(signal.SIGHUP)
        # Both workers reloaded (the counters of every worker are summed) and none was replaced.
        wait_until(lambda: reloads(base).get("success") == 2.0, timeout=15)
        assert set(json.loads((metrics_dir / "lbapp-workers.json").read_text())) == workers
        wait_until(lambda: servers(base, 6) == {"b": 6}, timeout=15)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        sock.close()


def _up(base: str, proc: subprocess.Popen[bytes]) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"lbapp exited with {proc.returncode}")
    try:
        return httpx.get(base + "/lb-health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_reload_counts_start_at_zero(echo_backends: list[EchoBackend]) -> None:
    from .conftest import run_lb

    with run_lb([echo_backends[0].url]) as server:
        assert reloads(server.url) == {"success": 0.0, "error": 0.0, "timestamp": 0.0}
