"""Metrics: plain counters on the hot path, two views at read time (Prometheus and /lb-metrics).

The proxy only adds to ints; `PoolCollector` turns the same numbers into Prometheus families at
scrape time, and `lb_metrics()` into the original's JSON document: one source of truth.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .pool import HEALTHY, Backend, Pool


class Stats:
    """Load-balancer-wide counters; per-backend ones live on `Backend`."""

    __slots__ = ("failed", "latency_sum", "requests", "retries", "started", "success")

    def __init__(self) -> None:
        self.started = time.time()
        self.requests = 0
        self.success = 0
        self.failed = 0
        self.retries = 0
        self.latency_sum = 0.0

    def observe_response(self, backend: Backend, seconds: float) -> None:
        self.success += 1
        self.latency_sum += seconds


def lb_metrics(stats: Stats, pool: Pool) -> dict[str, Any]:
    """The `/lb-metrics` document (schema: shared/reference/lb-metrics.md)."""
    answered = stats.success + stats.failed
    return {
        "uptime_seconds": round(time.time() - stats.started, 3),
        "total_requests": stats.requests,
        "success_requests": stats.success,
        "failed_requests": stats.failed,
        "retry_attempts": stats.retries,
        "avg_latency_ms": round(stats.latency_sum / answered * 1000, 3) if answered else 0.0,
        "healthy_backends": len(pool.eligible),
        "total_backends": len(pool.backends),
        "backends": [
            {
                "url": b.url,
                "state": b.state,
                "active_connections": b.in_flight,
                "total_requests": b.total_requests,
                "total_failures": b.total_failures,
                "last_checked": b.last_checked.strftime("%Y-%m-%dT%H:%M:%SZ") if b.last_checked else None,
            }
            for b in pool.backends
        ],
    }


class PoolCollector(Collector):
    """Exposes `Stats` and the pool's backend state to Prometheus at scrape time."""

    def __init__(self, stats: Stats, pool: Pool) -> None:
        self.stats = stats
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        stats, backends = self.stats, self.pool.backends
        requests = CounterMetricFamily("lb_client_requests", "Client requests received by the proxy route.")
        requests.add_metric([], stats.requests)
        yield requests
        retries = CounterMetricFamily("lb_retries", "Extra upstream attempts after a failed one.")
        retries.add_metric([], stats.retries)
        yield retries
        attempts = CounterMetricFamily(
            "lb_backend_requests", "Upstream attempts per backend.", labels=["backend"]
        )
        failures = CounterMetricFamily("lb_backend_failures", "Failed upstream attempts.", labels=["backend"])
        in_flight = GaugeMetricFamily(
            "lb_backend_in_flight", "Requests in flight per backend.", labels=["backend"]
        )
        up = GaugeMetricFamily("lb_backend_up", "1 if the backend takes traffic.", labels=["backend"])
        for b in backends:
            attempts.add_metric([b.url], b.total_requests)
            failures.add_metric([b.url], b.total_failures)
            in_flight.add_metric([b.url], b.in_flight)
            up.add_metric([b.url], 1 if b.state == HEALTHY else 0)
        yield from (attempts, failures, in_flight, up)


def create_registry(stats: Stats, pool: Pool) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PoolCollector(stats, pool))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
