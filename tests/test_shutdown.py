"""Graceful shutdown: SIGTERM lets in-flight requests finish intact; `LB_SHUTDOWN_DELAY` drains.

With a delay, `/lb-ready` fails at once while new connections are still accepted and served, and the
listening socket closes only after the delay (shutdown.py). The load balancer binds its own port
here (not an inherited socket, which the test process would keep listening), so "stops accepting"
is a refused connection, as with `uvicorn --port`.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import ROOT, LBProcess, wait_until


def test_sigterm_finishes_in_flight_requests(echo_factory: Any) -> None:
    slow = echo_factory("slow", "--latency", "1")
    lb = LBProcess({"LB_BACKENDS": slow.url, "LB_HEALTH_INTERVAL": "60"}, "--timeout-graceful-shutdown", "10")
    result: dict[str, Any] = {}

    def request() -> None:
        result["response"] = httpx.get(lb.url + "/in-flight", timeout=20)

    try:
        worker = threading.Thread(target=request)
        worker.start()
        metrics = lambda: httpx.get(lb.url + "/lb-metrics").json()  # noqa: E731
        wait_until(lambda: metrics()["backends"][0]["active_connections"] == 1, timeout=10)
        lb.proc.send_signal(signal.SIGTERM)
        worker.join(timeout=20)
        # uvicorn re-raises the signal once it has shut down cleanly, so -SIGTERM is a clean exit.
        assert lb.proc.wait(timeout=20) in (0, -signal.SIGTERM)
    finally:
        lb.stop()
    assert result["response"].status_code == 200
    assert result["response"].json()["server"] == "slow"


class PortLB:
    """`uvicorn lbapp:app --port P` (or the launcher, `python -m lbapp --port P [--workers N]`):
    the server owns the listening socket and closes it on shutdown."""

    def __init__(self, env: dict[str, str], launcher: str = "uvicorn") -> None:
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.url = f"http://127.0.0.1:{self.port}"
        if launcher == "uvicorn":
            cmd = [sys.executable, "-m", "uvicorn", "lbapp:app", "--host", "127.0.0.1"]
            cmd += ["--port", str(self.port), "--no-access-log", "--log-level", "warning"]
            cmd += ["--timeout-graceful-shutdown", "20"]
        else:  # "lbapp" or "lbapp-w2"
            workers = "2" if launcher.endswith("w2") else "1"
            cmd = [sys.executable, "-m", "lbapp", "--port", str(self.port), "--workers", workers]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("LB_")}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**full_env, "LB_ACCESS_LOG": "false", **env})
        wait_until(self._up, timeout=20)

    def _up(self) -> bool:
        assert self.proc.poll() is None, f"lbapp exited with {self.proc.returncode}"
        try:
            return httpx.get(self.url + "/lb-ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def ready_status(self) -> int:
        return httpx.get(self.url + "/lb-ready", timeout=5).status_code

    def refuses(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=5).close()
        except ConnectionRefusedError:
            return True
        return False

    def workers(self) -> list[int]:
        """The worker processes of a `--workers N` supervisor (none for a single process)."""
        with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as children:
            pids = [int(pid) for pid in children.read().split()]
        return [pid for pid in pids if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]

    def stop(self) -> None:
        for pid in self.workers() if self.proc.poll() is None else []:
            os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def post_checked(url: str, size: int, seed: int) -> tuple[int, bool]:
    body = os.urandom(size)
    response = httpx.post(url + "/mirror", content=body, timeout=30)
    if response.status_code != 200:
        return response.status_code, False
    return 200, response.headers["x-body-sha256"] == hashlib.sha256(
        body
    ).hexdigest() and response.content == body


def busy(url: str) -> int:
    backends = httpx.get(url + "/lb-metrics", timeout=5).json()["backends"]
    return sum(int(b["active_connections"]) for b in backends)


@pytest.mark.parametrize("delay", [0.0, 1.0])
def test_requests_in_flight_at_sigterm_complete_intact(echo_factory: Any, delay: float) -> None:
    # Long enough that every upload is in flight at once before the first one is answered.
    backends = [echo_factory(f"b{i}", "--latency", "4") for i in (1, 2, 3)]
    env = {"LB_BACKENDS": ",".join(b.url for b in backends), "LB_SHUTDOWN_DELAY": str(delay)}
    lb = PortLB({**env, "LB_HEALTH_INTERVAL": "60", "LB_REQUEST_BUFFER": "0"})
    clients = 24
    try:
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            futures = [pool.submit(post_checked, lb.url, 256 * 1024 * (1 + n % 4), n) for n in range(clients)]
            wait_until(lambda: busy(lb.url) == clients, timeout=20)
            lb.proc.send_signal(signal.SIGTERM)
            results = [f.result(timeout=60) for f in futures]
        assert lb.proc.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        lb.stop()
    assert results == [(200, True)] * clients


@pytest.mark.parametrize("launcher", ["uvicorn", "lbapp", "lbapp-w2"])
def test_shutdown_delay_fails_readiness_first_and_serves_new_connections(
    echo_factory: Any, launcher: str
) -> None:
    backend = echo_factory("b1")
    env = {"LB_BACKENDS": backend.url, "LB_HEALTH_INTERVAL": "60", "LB_SHUTDOWN_DELAY": "60"}
    lb = PortLB(env, launcher)
    try:
        assert lb.ready_status() == 200
        lb.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: lb.ready_status() == 503, timeout=10)
        for _ in range(5):  # each on a new connection, all answered while draining
            response = httpx.get(lb.url + "/during-the-delay", timeout=10)
            assert (response.status_code, response.json()["server"]) == (200, "b1")
        assert httpx.get(lb.url + "/lb-health", timeout=10).status_code == 200  # alive, not ready
        assert lb.proc.poll() is None
        # A second signal cuts the delay short. uvicorn's worker supervisor handles only the first
        # (it then waits for its workers): the workers get the second one themselves.
        for pid in lb.workers() or [lb.proc.pid]:
            os.kill(pid, signal.SIGTERM)
        assert lb.proc.wait(timeout=20) in (0, -signal.SIGTERM)
        assert lb.refuses()
    finally:
        lb.stop()


def test_the_listener_closes_only_after_the_delay(echo_factory: Any) -> None:
    backend = echo_factory("b1")
    delay = 1.5
    lb = PortLB({"LB_BACKENDS": backend.url, "LB_HEALTH_INTERVAL": "60", "LB_SHUTDOWN_DELAY": str(delay)})
    try:
        signalled = time.monotonic()
        lb.proc.send_signal(signal.SIGTERM)
        wait_until(lb.refuses, timeout=20)
        assert time.monotonic() - signalled >= delay  # a lower bound only: a slow machine passes
        assert lb.proc.wait(timeout=20) in (0, -signal.SIGTERM)
    finally:
        lb.stop()
