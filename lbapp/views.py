"""The views built from the metric families: `/metrics`, `/lb-metrics` and the status page's data.

`Metrics` owns them; `/lb-metrics` and the status page read the Prometheus families back
(`Samples`), so the views can never disagree.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    generate_latest,
)
from prometheus_client.core import (
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .backend import HEALTHY, STATES, UNHEALTHY, Backend
from .cluster import Clusters
from .metrics import BUCKET_LABELS, BUCKETS, BUDGET_EXHAUSTED, WINDOW, Stats, families, to_prometheus
from .multiproc import MultiprocessStore
from .version import VERSION


class Samples:
    """Prometheus samples read back, for the JSON views: `value("lb_backend_up", backend=url)`."""

    def __init__(self, metrics: Iterable[Metric]) -> None:
        self.by_name: dict[str, list[tuple[dict[str, str], float]]] = {}
        for metric in metrics:
            for s in metric.samples:
                self.by_name.setdefault(s.name, []).append((s.labels, s.value))

    def total(self, name: str, **match: str) -> float:
        return sum(
            value
            for labels, value in self.by_name.get(name, ())
            if all(labels.get(k) == v for k, v in match.items())
        )

    def find(self, name: str, **match: str) -> float | None:
        for labels, value in self.by_name.get(name, ()):
            if all(labels.get(k) == v for k, v in match.items()):
                return value
        return None

    def buckets(self, name: str, **match: str) -> list[tuple[float, float]]:
        """Cumulative (upper bound, count) pairs of a histogram, summed over matching series."""
        sums: dict[float, float] = {}
        for labels, value in self.by_name.get(name + "_bucket", ()):
            if all(labels.get(k) == v for k, v in match.items()):
                bound = float(labels["le"])
                sums[bound] = sums.get(bound, 0.0) + value
        return sorted(sums.items())


def _rfc3339(timestamp: float | None) -> str | None:
    if not timestamp:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def backend_document(samples: Samples, b: Backend) -> dict[str, Any]:
    """One backend in `/lb-metrics` (schema: lb-metrics.md), read from the Prometheus samples."""
    at = {"route": b.route, "backend": b.url}
    up = samples.total("lb_backend_up", **at) > 0
    in_state = [s for s in STATES if samples.total("lb_backend_state", state=s, **at) > 0]
    return {
        "url": b.url,
        "state": in_state[0] if len(in_state) == 1 else HEALTHY if up else UNHEALTHY,
        "active_connections": int(samples.total("lb_backend_in_flight", **at)),
        "total_requests": int(samples.total("lb_backend_requests_total", **at)),
        "total_failures": int(samples.total("lb_backend_failures_total", **at)),
        "last_checked": _rfc3339(samples.find("lb_backend_last_check_timestamp_seconds", **at)),
        "up": up,
    }


def lb_metrics(samples: Samples, clusters: Clusters, now: float | None = None) -> dict[str, Any]:
    """The `/lb-metrics` document: `backends` is the default pool; route pools are in `routes`."""
    now = time.time() if now is None else now
    count = samples.total("lb_request_duration_seconds_count")
    latency = samples.total("lb_request_duration_seconds_sum")
    started = samples.find("lb_start_time_seconds") or now
    pools = []
    for cluster in clusters:
        backends = [backend_document(samples, b) for b in cluster.pool.backends]
        healthy = sum(1 for b in backends if b.pop("up"))
        pools.append({"prefix": cluster.prefix, "healthy_backends": healthy, "total_backends": len(backends),
                      "backends": backends})  # fmt: skip
    default, routes = pools[0], pools[1:]
    document: dict[str, Any] = {
        "uptime_seconds": round(now - started, 3),
        "total_requests": int(samples.total("lb_requests_received_total")),
        "success_requests": int(samples.total("lb_backend_responses_total")),
        "failed_requests": int(samples.total("lb_error_responses_total")),
        "retry_attempts": int(
            samples.total("lb_retries_total") - samples.total("lb_retries_total", reason=BUDGET_EXHAUSTED)
        ),
        "avg_latency_ms": round(latency / count * 1000, 3) if count else 0.0,
        "healthy_backends": default["healthy_backends"],
        "total_backends": default["total_backends"],
        "backends": default["backends"],
    }
    if routes:
        document["routes"] = routes
    return document


# --- the status page: rates and quantiles over the last minute -----------------------------------

Key = tuple[str, str]  # (route, backend url)
Snapshot = dict[Key, tuple[float, float, tuple[float, ...]]]  # -> (requests, 5xx, cumulative buckets)


def snapshot(samples: Samples, clusters: Clusters) -> Snapshot:
    result: Snapshot = {}
    for cluster in clusters:
        for b in cluster.pool.backends:
            at = {"route": b.route, "backend": b.url}
            buckets = samples.buckets("lb_request_duration_seconds", **at)
            result[(b.route, b.url)] = (
                samples.total("lb_requests_total", **at),
                samples.total("lb_requests_total", code="5xx", **at),
                tuple(count for _, count in buckets) if buckets else (0.0,) * len(BUCKET_LABELS),
            )
    return result


def quantile(q: float, bounds: tuple[float, ...], cumulative: tuple[float, ...]) -> float | None:
    """PromQL's histogram_quantile: linear interpolation inside the bucket holding rank q."""
    total = cumulative[-1] if cumulative else 0
    if total <= 0:
        return None
    rank = q * total
    index = bisect.bisect_left(cumulative, rank)
    if index >= len(bounds):  # in the +Inf bucket: the highest finite bound is all we know
        return bounds[-1]
    lower = bounds[index - 1] if index > 0 else 0.0
    below = cumulative[index - 1] if index > 0 else 0.0
    inside = cumulative[index] - below
    return lower + (bounds[index] - lower) * ((rank - below) / inside if inside else 1.0)


class History:
    """Snapshots of the last minute, one per tick, for rates and quantiles over a window."""

    def __init__(self, window: float = WINDOW) -> None:
        self.window = window
        self.points: deque[tuple[float, Snapshot]] = deque()

    def add(self, at: float, point: Snapshot) -> None:
        self.points.append((at, point))
        while len(self.points) > 1 and at - self.points[1][0] >= self.window:
            self.points.popleft()

    def rows(self, now: float, current: Snapshot) -> tuple[float, dict[Key, dict[str, float | None]]]:
        """Per backend: requests per second, error ratio, p50 and p99 (ms) since the oldest point."""
        if not self.points:
            return 0.0, {key: _empty_row() for key in current}
        at, old = self.points[0]
        seconds = now - at
        result: dict[Key, dict[str, float | None]] = {}
        for key, (requests, errors, buckets) in current.items():
            before = old.get(key, (0.0, 0.0, (0.0,) * len(buckets)))
            n = requests - before[0]
            delta = tuple(a - b for a, b in zip(buckets, before[2], strict=True))
            p50, p99 = quantile(0.5, BUCKETS, delta), quantile(0.99, BUCKETS, delta)
            result[key] = {
                "requests": n,
                "rps": round(n / seconds, 3) if seconds > 0 else None,
                "error_rate": round((errors - before[1]) / n, 4) if n > 0 else None,
                "p50_ms": round(p50 * 1000, 2) if p50 is not None else None,
                "p99_ms": round(p99 * 1000, 2) if p99 is not None else None,
            }
        return seconds, result


def _empty_row() -> dict[str, float | None]:
    return {"requests": 0, "rps": None, "error_rate": None, "p50_ms": None, "p99_ms": None}


# --- the facade the application uses --------------------------------------------------------------


class PoolCollector(Collector):
    """The aggregated families: this process's ints, or every worker's through the value files."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self.metrics.collect()


class BuildInfoCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("lb_build_info", "lbapp build information.", labels=["version"])
        info.add_metric([VERSION], 1)
        yield info


class Metrics:
    """Owns the views: `/metrics`, `/lb-metrics`, the status JSON, and the multiprocess flush."""

    def __init__(self, stats: Stats, clusters: Clusters, multiproc_dir: str | None = None) -> None:
        self.stats = stats
        self.clusters = clusters
        self.store = MultiprocessStore(multiproc_dir) if multiproc_dir else None
        self.history = History()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(PoolCollector(self))
        self.registry.register(BuildInfoCollector())
        # The default process metrics (in multiprocess mode: of the worker that serves the scrape).
        for default in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(default)
        if self.store is not None:
            self.store.prepare()

    def flush(self) -> None:
        """Write this worker's numbers to the value files (no-op with a single process)."""
        if self.store is not None:
            self.store.write(families(self.stats, self.clusters))

    def collect(self) -> Iterable[Metric]:
        if self.store is None:
            return to_prometheus(families(self.stats, self.clusters))
        self.flush()  # this worker is exact; the others are at most one flush interval behind
        return self.store.read()

    def samples(self) -> Samples:
        return Samples(self.collect())

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def lb_metrics(self) -> dict[str, Any]:
        return lb_metrics(self.samples(), self.clusters)

    def tick(self) -> None:
        """Every flush interval: flush, and remember a point for the status page's window."""
        now = time.monotonic()
        if self.store is None:
            self.history.add(now, snapshot(self.samples(), self.clusters))
            return
        self.flush()
        # Reading every worker's files costs a little: keep history only while someone watches.
        if time.time() - self.store.status_wanted_at() < 2 * WINDOW:
            self.history.add(now, snapshot(Samples(self.store.read()), self.clusters))

    def status(self) -> dict[str, Any]:
        """The status page's data: every backend's state, weight, load and last-minute numbers."""
        now = time.monotonic()
        if self.store is not None and time.time() - self.store.status_wanted_at() > 1:
            self.store.want_status()
        samples = self.samples()
        current = snapshot(samples, self.clusters)
        if not self.history.points:
            self.history.add(now, current)
        window, rows = self.history.rows(now, current)
        document = lb_metrics(samples, self.clusters)
        backends = []
        for cluster in self.clusters:
            for b in cluster.pool.backends:
                doc = backend_document(samples, b)
                del doc["up"]
                weight = samples.find("lb_backend_weight", route=b.route, backend=b.url)
                row = rows[(b.route, b.url)]
                backends.append({**doc, "route": b.route, "weight": int(weight or 0),
                                 "in_flight": doc["active_connections"], **row})  # fmt: skip
        return {
            "generated_at": _rfc3339(time.time()),
            "window_seconds": round(window, 1),
            "workers": "all" if self.store is not None else "this process",
            "uptime_seconds": document["uptime_seconds"],
            "total_requests": document["total_requests"],
            "in_flight": int(samples.total("lb_requests_in_flight")),
            "healthy_backends": sum(1 for b in backends if b["state"] == HEALTHY),
            "total_backends": len(backends),
            "backends": backends,
        }

    def close(self) -> None:
        if self.store is not None:
            self.flush()
            self.store.close()
