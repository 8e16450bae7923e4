"""Several workers: with PROMETHEUS_MULTIPROC_DIR, both views show the sum over all workers."""

from __future__ import annotations

import glob
import os
import threading
from pathlib import Path

import httpx
from prometheus_client.multiprocess import MultiProcessCollector

from .conftest import EchoBackend, LBProcess, wait_until
from .test_metrics import prometheus_samples, total

REQUESTS = 240


def worker_pids(directory: Path) -> set[str]:
    return {Path(f).stem.rsplit("_", 1)[1] for f in glob.glob(str(directory / "counter_*.db"))}


def requests_per_worker(directory: Path) -> dict[str, float]:
    counts = {}
    for name in glob.glob(str(directory / "counter_*.db")):
        for metric in MultiProcessCollector.merge([name]):
            if metric.name == "lb_requests_received":
                counts[Path(name).stem.rsplit("_", 1)[1]] = sum(s.value for s in metric.samples)
    return counts


def test_two_workers_count_every_request_in_both_views(
    echo_backends: list[EchoBackend], tmp_path: Path
) -> None:
    directory = tmp_path / "metrics"
    directory.mkdir()
    (directory / "counter_1.db").write_bytes(b"left over from an earlier run")
    env = {
        "LB_BACKENDS": echo_backends[0].url,
        "LB_HEALTH_INTERVAL": "60",
        "LB_ACCESS_LOG": "false",
        "PROMETHEUS_MULTIPROC_DIR": str(directory),
    }
    lb = LBProcess(env, "--workers", "2")
    try:
        # Each worker writes its files when its lifespan starts: wait for both.
        wait_until(lambda: len(worker_pids(directory)) == 2, timeout=30)
        assert not (directory / "counter_1.db").exists()  # wiped by the first worker

        def send(count: int) -> None:
            # No keep-alive: every request is a new connection, which either worker may accept.
            with httpx.Client(limits=httpx.Limits(max_keepalive_connections=0)) as client:
                for i in range(count):
                    assert client.get(f"{lb.url}/n/{i}").status_code == 200

        threads = [threading.Thread(target=send, args=(REQUESTS // 8,)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)

        # A scrape flushes the worker serving it; the other one flushes every second.
        def both_views_complete() -> bool:
            document = httpx.get(lb.url + "/lb-metrics").json()
            samples = prometheus_samples(httpx.get(lb.url + "/metrics").text)
            return document["total_requests"] == REQUESTS and total(samples, "lb_requests_total") == REQUESTS

        wait_until(both_views_complete, timeout=10, interval=0.1)
        per_worker = requests_per_worker(directory)
        assert len(per_worker) == 2 and all(n > 0 for n in per_worker.values()), per_worker
        assert sum(per_worker.values()) == REQUESTS

        document = httpx.get(lb.url + "/lb-metrics").json()
        samples = prometheus_samples(httpx.get(lb.url + "/metrics").text)
        assert document["total_requests"] == document["success_requests"] == REQUESTS
        assert document["backends"][0]["total_requests"] == REQUESTS
        assert document["backends"][0]["active_connections"] == 0
        assert document["healthy_backends"] == 1
        assert total(samples, "lb_requests_received_total") == REQUESTS
        assert total(samples, "lb_requests_total", code="2xx", method="GET") == REQUESTS
        assert total(samples, "lb_request_duration_seconds_count") == REQUESTS
        assert total(samples, "lb_backend_requests_total") == REQUESTS
        assert total(samples, "lb_requests_in_flight") == 0
        assert total(samples, "lb_backend_up") == 1  # livemax: one backend, not one per worker
        assert total(samples, "lb_build_info") == 1
    finally:
        lb.stop()
    # Dead workers: their counters stay, their live gauges are gone.
    names = os.listdir(directory)
    assert any(n.startswith("counter_") for n in names)
    assert not any(n.startswith("gauge_live") for n in names), names
