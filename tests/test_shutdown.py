"""Graceful shutdown: SIGTERM lets in-flight requests finish, then the process exits cleanly."""

from __future__ import annotations

import signal
import threading
from typing import Any

import httpx

from .conftest import LBProcess, wait_until


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
