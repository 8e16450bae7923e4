"""The launcher (lbapp/cli.py): `lbapp --check`, the console script, flags, `--workers 2`, SIGTERM.

Real processes only: `python -m lbapp` (and the installed `lbapp` script) in subprocesses.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from .conftest import ROOT, EchoBackend, LauncherProcess, wait_until


def run_launcher(
    *args: str, env: dict[str, str] | None = None, cwd: str = ROOT
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LB_")}
    full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "lbapp", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_accepts_a_good_configuration() -> None:
    result = run_launcher("--check", env={"LB_BACKENDS": "http://127.0.0.1:9,http://127.0.0.1:10"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lbapp: configuration OK"), result.stdout
    assert "2 backends" in lines[0] and "127.0.0.1:8080" in lines[0]


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"LB_MAX_HEADER_SIZE": "lots"}, "LB_MAX_HEADER_SIZE"),
        ({"LB_CLIENT_HEADER_TIMEOUT": "0"}, "LB_CLIENT_HEADER_TIMEOUT"),
        ({"LB_GRACEFUL_TIMEOUT": "soon"}, "LB_GRACEFUL_TIMEOUT"),
        ({"LB_MAX_HEADER_COUNT": "0"}, "LB_MAX_HEADER_COUNT"),
        ({"LB_PORT": "70000"}, "LB_PORT"),
        ({"LB_BACKENDS": "ftp://x"}, "LB_BACKENDS"),
        # Found only by building the app (the policy is looked up by create_app).
        ({"LB_ALGORITHM": "no_such_policy"}, "LB_ALGORITHM"),
    ],
)
def test_check_rejects_a_bad_setting_with_one_line(env: dict[str, str], field: str) -> None:
    result = run_launcher("--check", env=env)
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line, never a traceback
    assert lines[0].startswith(f"lbapp: invalid setting {field}"), lines[0]
    assert result.stdout == ""


def test_check_builds_the_routes(tmp_path: Path) -> None:
    """A routes table with a bad policy fails the check: the whole app is built, not just settings."""
    config = tmp_path / "lbapp.json"
    routes = [{"prefix": "/api", "backends": ["http://127.0.0.1:9"], "algorithm": "no_such_policy"}]
    config.write_text(json.dumps({"backends": ["http://127.0.0.1:10"], "routes": routes}))
    result = run_launcher("--check", env={"LB_CONFIG": str(config)})
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("lbapp: ") and "no_such_policy" in result.stderr, result.stderr
    routes[0]["algorithm"] = "least_conn"
    config.write_text(json.dumps({"backends": ["http://127.0.0.1:10"], "routes": routes}))
    result = run_launcher("--check", env={"LB_CONFIG": str(config)})
    assert result.returncode == 0, result.stderr
    assert "1 routes" in result.stdout


def test_flags_win_over_settings_and_are_validated() -> None:
    result = run_launcher("--check", "--host", "0.0.0.0", "--port", "9091", env={"LB_PORT": "9090"})
    assert result.returncode == 0, result.stderr
    assert "0.0.0.0:9091" in result.stdout
    result = run_launcher("--check", "--workers", "0")
    assert result.returncode == 1
    assert result.stderr.startswith("lbapp: invalid setting LB_WORKERS: "), result.stderr


def test_console_script_is_the_launcher() -> None:
    script = Path(sys.executable).parent / "lbapp"
    assert script.exists(), "pip install -e . installs the `lbapp` console script"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LB_")}
    result = subprocess.run(
        [str(script), "--check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("lbapp: configuration OK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_serves_on_host_and_port_from_the_settings() -> None:
    """Without --fd: LB_HOST and LB_PORT pick the address; SIGTERM shuts it down gracefully."""
    backend = EchoBackend("backend-1").start()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LB_")}
    env.update({"LB_BACKENDS": backend.url, "LB_HOST": "127.0.0.1", "LB_PORT": str(port)})
    proc = subprocess.Popen([sys.executable, "-m", "lbapp"], cwd=ROOT, env=env, stderr=subprocess.PIPE)
    try:

        def answers() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"lbapp exited with {proc.returncode}")
            try:
                return httpx.get(f"http://127.0.0.1:{port}/x", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(answers, timeout=30)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        # uvicorn re-raises the signal once shut down: the exit status says "ended by SIGTERM".
        assert proc.returncode in (0, -signal.SIGTERM), stderr
        assert b"Application shutdown complete" in stderr, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        backend.stop()


def workers_of(pid: int) -> list[psutil.Process]:
    """uvicorn's worker processes (multiprocessing's resource tracker is a child too)."""
    return [p for p in psutil.Process(pid).children() if "spawn_main" in " ".join(p.cmdline())]


def test_two_workers_serve_with_the_hardened_protocol() -> None:
    backend = EchoBackend("backend-1").start()
    env = {"LB_BACKENDS": backend.url, "LB_HEALTH_INTERVAL": "60", "LB_CLIENT_HEADER_TIMEOUT": "1"}
    lb = LauncherProcess(env, "--workers", "2")
    try:
        # Two worker processes under the launcher, and requests served through them.
        wait_until(lambda: len(workers_of(lb.proc.pid)) == 2, timeout=30)
        for i in range(6):
            with httpx.Client(timeout=5) as client:  # a fresh connection each time
                response = client.get(f"{lb.url}/proxied/{i}")
            assert response.status_code == 200 and response.json()["path"] == f"/proxied/{i}"
        # The head timeout reached the workers (the protocol's limits are pickled into them).
        with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as sock:
            sock.settimeout(10)
            assert sock.recv(1024).startswith(b"HTTP/1.1 408 ")
    finally:
        lb.stop()
        backend.stop()


def test_serves_on_a_unix_socket_and_removes_it(tmp_path: Path) -> None:
    backend = EchoBackend("backend-1").start()
    path = tmp_path / "lbapp.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LB_")}
    env.update({"LB_BACKENDS": backend.url, "LB_HEALTH_INTERVAL": "60"})
    proc = subprocess.Popen([sys.executable, "-m", "lbapp", "--uds", str(path)], cwd=ROOT, env=env)
    try:
        client = httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), timeout=5)

        def answers() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"lbapp exited with {proc.returncode}")
            try:
                return client.get("http://lbapp/over-uds").json()["path"] == "/over-uds"
            except httpx.HTTPError:
                return False

        wait_until(answers, timeout=30)
        client.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert not path.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        backend.stop()


def test_graceful_timeout_bounds_the_shutdown(tmp_path: Path) -> None:
    """SIGTERM with a request in flight for 60 s: the process ends after LB_GRACEFUL_TIMEOUT (1 s),
    not after the request (uvicorn alone waits for it)."""
    ids = tmp_path / "ids.log"
    backend = EchoBackend("backend-1", "--id-log", str(ids)).start()
    env = {"LB_BACKENDS": backend.url, "LB_HEALTH_INTERVAL": "60", "LB_GRACEFUL_TIMEOUT": "1"}
    env["LB_UPSTREAM_TIMEOUT"] = "120"
    lb = LauncherProcess(env)
    try:
        with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as sock:
            sock.sendall(b"GET /sleep/60 HTTP/1.1\r\nHost: lb.test\r\nX-Request-ID: slow-1\r\n\r\n")
            # In flight once the backend has it (it logs the id before it sleeps).
            wait_until(lambda: ids.exists() and "slow-1" in ids.read_text(), timeout=15)
            start = time.monotonic()
            lb.proc.send_signal(signal.SIGTERM)
            lb.proc.wait(timeout=30)
            assert time.monotonic() - start < 30  # far below the request's 60 s
    finally:
        lb.stop()
        backend.stop()


def test_client_keepalive_timeout_closes_an_idle_connection() -> None:
    """LB_CLIENT_KEEPALIVE_TIMEOUT reaches uvicorn: an idle keep-alive connection is closed."""
    backend = EchoBackend("backend-1").start()
    lb = LauncherProcess({"LB_BACKENDS": backend.url, "LB_CLIENT_KEEPALIVE_TIMEOUT": "0.3"})
    try:
        with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as sock:
            # 4 s: well past the 0.3 s setting, and short of uvicorn's default of 5 s, so the
            # setting (not the default) must have closed it.
            sock.settimeout(4)
            sock.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            received = b""
            while True:  # the answer, then EOF
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
            assert received.startswith(b"HTTP/1.1 200 ") and received.count(b"HTTP/1.1") == 1
    finally:
        lb.stop()
        backend.stop()


def test_one_worker_writes_its_access_log(tmp_path: Path) -> None:
    """uvicorn's logging config (applied when the launcher builds its Config) must not silence
    lbapp's log writer: every proxied request gets its access line, and the start-up lines show."""
    backend = EchoBackend("backend-1").start()
    log_path = tmp_path / "stderr.log"
    with log_path.open("wb") as log:
        lb = LauncherProcess({"LB_BACKENDS": backend.url, "LB_ACCESS_LOG": "true"}, stderr=log)
        try:
            for i in range(5):
                assert httpx.get(f"{lb.url}/logged/{i}", timeout=5).status_code == 200
        finally:
            lb.stop()
            backend.stop()
    text = log_path.read_text()
    assert "route /: balancing 1 backends" in text, text
    for i in range(5):
        assert f'"GET /logged/{i}" 200' in text, text
