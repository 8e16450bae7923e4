"""Metrics: plain counters on the hot path, every view built from them at read time.

The proxy only adds to ints (on `Stats` and on each `Backend`). `families()` turns those numbers
into a list of `Family` records; from there, one way each:

- Prometheus `/metrics`: `to_prometheus()` (one process) or, with `PROMETHEUS_MULTIPROC_DIR`,
  `MultiprocessStore` writes every worker's families to prometheus-client's value files and
  prometheus-client's `MultiProcessCollector` sums them;
- `/lb-metrics` and the status page read the *Prometheus families* back (`Samples`), so the two
  views can never disagree: one source of truth.

No prometheus-client metric object is touched per request (they take a lock on every `inc`).
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import glob
import json
import logging
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from prometheus_client.values import MultiProcessValue

from .pool import HEALTHY, STATES, UNHEALTHY, Backend, Pool

logger = logging.getLogger("lbapp.metrics")

VERSION = "0.1.0"
# Upper bounds (seconds) of the latency histogram: 1 ms to 10 s, roughly x2.5 apart.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BUCKET_LABELS = (*(repr(b) for b in BUCKETS), "+Inf")  # as prometheus-client writes them
# Label values are bounded: an unknown method is "OTHER", a status is its class.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"})
CODE_CLASSES = ("5xx", "1xx", "2xx", "3xx", "4xx", "5xx")
NO_BACKEND = "none"  # the `backend` label of requests the load balancer answered without one
ERROR_KINDS = ("connect", "timeout", "reset", "protocol")
BUDGET_EXHAUSTED = "budget_exhausted"  # lb_retries_total reason: a retry the budget refused
RETRY_REASONS = (*ERROR_KINDS, BUDGET_EXHAUSTED)
RELOAD_RESULTS = ("success", "failure")
LB_ERROR_CODES = (502, 503, 504)
WINDOW = 60.0  # seconds of history behind the status page's rates and quantiles


def code_class(status: int) -> str:
    """`2xx` for 200..299; anything outside 100..599 (a crash before any answer) counts as 5xx."""
    return CODE_CLASSES[status // 100] if 100 <= status < 600 else "5xx"


def error_kind(error: BaseException | None) -> str:
    """The `kind` of a failed upstream attempt: connect, timeout, reset or protocol."""
    if isinstance(error, httpx.TimeoutException):
        return "timeout"
    if isinstance(error, httpx.ConnectError):
        return "connect"
    if isinstance(error, httpx.NetworkError):  # ReadError, WriteError, CloseError
        return "reset"
    return "protocol"


class Histogram:
    """Bucket counts (not cumulative; the last one is +Inf) and a sum: one bisect per observation."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds


class Tapped(Protocol):
    """What `Stats.end` needs to know about one exchange (see `observe.Tap`)."""

    bytes_in: int
    bytes_out: int
    headers_at: float


class Stats:
    """Load-balancer-wide counters; per-backend ones live on `Backend`. Mutated on the event loop only."""

    __slots__ = (
        "answered",
        "bytes_in",
        "bytes_out",
        "config_reloads",
        "durations",
        "in_flight",
        "lb_errors",
        "rate_limited",
        "requests",
        "retries",
        "started",
        "success",
        "upstream_errors",
    )

    def __init__(self) -> None:
        self.started = time.time()
        self.requests = 0  # received by the proxy route
        self.in_flight = 0
        self.success = 0  # answered with a backend's response
        self.lb_errors: dict[int, int] = {}  # answered by the load balancer itself, by status
        self.retries: dict[str, int] = {}  # by the kind of the failure that caused them
        self.answered: dict[tuple[str, str, str], int] = {}  # (backend, method, code class)
        self.durations: dict[str, Histogram] = {}  # by backend label
        self.bytes_in: dict[str, int] = {}
        self.bytes_out: dict[str, int] = {}
        self.upstream_errors: dict[tuple[str, str], int] = {}  # (backend, kind)
        self.rate_limited = 0  # no rate limiter yet: exported as 0 so dashboards need no change
        self.config_reloads = dict.fromkeys(RELOAD_RESULTS, 0)  # no reload yet, same reason

    @property
    def failed(self) -> int:
        return sum(self.lb_errors.values())

    def begin(self) -> None:
        self.requests += 1
        self.in_flight += 1

    def end(self, backend: Backend | None, method: str, status: int, tap: Tapped, started: float) -> None:
        """One client request is over (answered, failed or abandoned): count it once."""
        self.in_flight -= 1
        label = backend.url if backend is not None else NO_BACKEND
        key = (label, method if method in METHODS else "OTHER", code_class(status))
        self.answered[key] = self.answered.get(key, 0) + 1
        if tap.headers_at:
            histogram = self.durations.get(label)
            if histogram is None:
                histogram = self.durations[label] = Histogram()
            histogram.observe(tap.headers_at - started)
        if tap.bytes_in:
            self.bytes_in[label] = self.bytes_in.get(label, 0) + tap.bytes_in
        if tap.bytes_out:
            self.bytes_out[label] = self.bytes_out.get(label, 0) + tap.bytes_out

    def observe_response(self, backend: Backend) -> None:
        """The response headers of `backend` went to the client."""
        self.success += 1

    def observe_error(self, status: int) -> None:
        """The load balancer answered with its own error (502/503/504)."""
        self.lb_errors[status] = self.lb_errors.get(status, 0) + 1

    def upstream_error(self, backend: Backend, error: BaseException) -> None:
        """An attempt to `backend` failed (before or during its response)."""
        backend.total_failures += 1
        key = (backend.url, error_kind(error))
        self.upstream_errors[key] = self.upstream_errors.get(key, 0) + 1

    def retry(self, error: BaseException | None) -> None:
        reason = error_kind(error)
        self.retries[reason] = self.retries.get(reason, 0) + 1

    def retry_denied(self) -> None:
        """A retry that was safe but refused by the retry budget (not an attempt)."""
        self.retries[BUDGET_EXHAUSTED] = self.retries.get(BUDGET_EXHAUSTED, 0) + 1


@dataclass(slots=True)
class Family:
    """One metric family as plain data: what `families()` produces and every view consumes.

    `samples` maps label values to a number, or for a histogram to (bucket counts, sum).
    `mode` is the prometheus-client multiprocess gauge mode used to combine workers.
    """

    name: str
    doc: str
    type: str
    labels: tuple[str, ...] = ()
    mode: str = ""
    samples: dict[tuple[str, ...], Any] = field(default_factory=dict)


def families(stats: Stats, pool: Pool) -> list[Family]:
    """Every aggregated metric of this process, read from the hot path's ints."""
    backends = pool.backends
    eligible = set(pool.eligible)
    urls = [b.url for b in backends]

    def per_backend(name: str, doc: str, type_: str, values: Iterable[float], mode: str = "") -> Family:
        return Family(
            name, doc, type_, ("backend",), mode, {(u,): v for u, v in zip(urls, values, strict=True)}
        )

    requests = Family(
        "lb_requests",
        "Client requests finished, by the backend that answered or was tried last (none: no backend),"
        " method and status class.",
        "counter",
        ("backend", "method", "code"),
    )
    requests.samples = {key: value for key, value in stats.answered.items()}
    durations = Family(
        "lb_request_duration_seconds",
        "Time from request received to response headers sent.",
        "histogram",
        ("backend",),
    )
    durations.samples = {(label,): (h.counts, h.sum) for label, h in stats.durations.items()}
    upstream_errors = Family(
        "lb_upstream_errors",
        "Failed upstream attempts by kind (connect, timeout, reset, protocol).",
        "counter",
        ("backend", "kind"),
    )
    upstream_errors.samples = {
        (u, k): stats.upstream_errors.get((u, k), 0) for u in urls for k in ERROR_KINDS
    }
    checks = Family(
        "lb_health_checks",
        "Active health checks by result (pass, fail).",
        "counter",
        ("backend", "result"),
    )
    for b in backends:
        checks.samples[(b.url, "pass")] = b.checks_passed
        checks.samples[(b.url, "fail")] = b.checks_failed
    state = Family(
        "lb_backend_state", "1 for the state the backend is in.", "gauge", ("backend", "state"), "livemax"
    )
    state.samples = {(b.url, s): int(b.state == s) for b in backends for s in STATES}
    last_checked = Family(
        "lb_backend_last_check_timestamp_seconds",
        "Unix time of the last active health check.",
        "gauge",
        ("backend",),
        "max",
    )
    last_checked.samples = {(b.url,): b.last_checked.timestamp() for b in backends if b.last_checked}

    return [
        Family("lb_requests_received", "Client requests received by the proxy route.", "counter",
               samples={(): stats.requests}),
        requests,
        Family("lb_backend_responses", "Client requests answered with a backend's response.", "counter",
               samples={(): stats.success}),
        Family("lb_error_responses", "Client requests answered by the load balancer's own error.",
               "counter", ("code",), samples={(str(c),): stats.lb_errors.get(c, 0) for c in LB_ERROR_CODES}),
        durations,
        Family("lb_request_bytes", "Request body bytes received from clients.", "counter", ("backend",),
               samples={(k,): v for k, v in stats.bytes_in.items()}),
        Family("lb_response_bytes", "Response body bytes sent to clients.", "counter", ("backend",),
               samples={(k,): v for k, v in stats.bytes_out.items()}),
        Family("lb_requests_in_flight", "Client requests being handled.", "gauge", (), "livesum",
               {(): stats.in_flight}),
        per_backend("lb_backend_in_flight", "Upstream requests in flight per backend.", "gauge",
                    (b.in_flight for b in backends), "livesum"),
        per_backend("lb_backend_requests", "Upstream attempts sent to the backend.", "counter",
                    (b.total_requests for b in backends)),
        per_backend("lb_backend_failures", "Upstream attempts to the backend that failed.", "counter",
                    (b.total_failures for b in backends)),
        per_backend("lb_backend_up", "1 if the backend is eligible for traffic (healthy, weight > 0).",
                    "gauge", (int(b in eligible) for b in backends), "livemax"),
        state,
        per_backend("lb_backend_weight", "Configured weight of the backend.", "gauge",
                    (b.weight for b in backends), "livemax"),
        last_checked,
        upstream_errors,
        Family("lb_retries", "Extra upstream attempts, by the kind of failure that caused them;"
               " budget_exhausted: retries refused by the retry budget.", "counter",
               ("reason",), samples={(k,): stats.retries.get(k, 0) for k in RETRY_REASONS}),
        checks,
        per_backend("lb_outlier_ejections", "Backends ejected by passive outlier detection.", "counter",
                    (b.ejections for b in backends)),
        Family("lb_rate_limited", "Client requests refused by rate limiting.", "counter",
               samples={(): stats.rate_limited}),
        Family("lb_config_reloads", "Configuration reloads by result.", "counter", ("result",),
               samples={(r,): v for r, v in stats.config_reloads.items()}),
        Family("lb_start_time_seconds", "Unix time the load balancer started.", "gauge", (), "min",
               {(): stats.started}),
    ]  # fmt: skip


def to_prometheus(items: Iterable[Family]) -> Iterator[Metric]:
    """Prometheus metric families for one process (cumulative buckets, `_count` from the buckets)."""
    for f in items:
        metric: Metric
        if f.type == "counter":
            metric = CounterMetricFamily(f.name, f.doc, labels=f.labels)
            for values, value in f.samples.items():
                metric.add_metric(values, value)
        elif f.type == "gauge":
            metric = GaugeMetricFamily(f.name, f.doc, labels=f.labels)
            for values, value in f.samples.items():
                metric.add_metric(values, value)
        else:
            metric = HistogramMetricFamily(f.name, f.doc, labels=f.labels)
            for values, (counts, total) in f.samples.items():
                buckets, acc = [], 0
                for bound, count in zip(BUCKET_LABELS, counts, strict=True):
                    acc += count
                    buckets.append((bound, acc))
                metric.add_metric(values, buckets, total)
        yield metric


class MultiprocessStore:
    """This worker's families, written to prometheus-client's multiprocess value files.

    Values are *set* to the worker's absolute numbers (not incremented), so a flush is idempotent
    and a worker's files always hold its latest flushed state. `MultiProcessCollector` sums the
    counters and histogram buckets of every worker (dead ones included: what they counted stays
    counted) and combines gauges by their mode (`livesum`, `livemax`: only live workers).
    """

    REGISTRY_FILE = "lbapp-workers.json"  # not *.db: MultiProcessCollector reads only those
    STATUS_FILE = "lbapp-status-wanted"

    def __init__(self, path: str) -> None:
        self.path = path
        self.pid = os.getpid()
        self.value_class = MultiProcessValue(lambda: self.pid)  # type: ignore[no-untyped-call]
        self.values: dict[tuple[str, tuple[str, ...]], Any] = {}
        self.collector = MultiProcessCollector(None, path=path)  # type: ignore[no-untyped-call]

    def prepare(self) -> None:
        """Wipe the directory if no other live lbapp worker uses it (first start), then register."""
        os.makedirs(self.path, exist_ok=True)
        with open(os.path.join(self.path, ".lbapp.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            registry = os.path.join(self.path, self.REGISTRY_FILE)
            try:
                with open(registry) as f:
                    pids = [int(p) for p in json.load(f)]
            except (OSError, ValueError, TypeError):
                pids = []
            alive = [p for p in pids if p != self.pid and _alive(p)]
            if not alive:
                removed = 0
                for name in glob.glob(os.path.join(self.path, "*.db")):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(name)
                        removed += 1
                logger.debug("metrics directory %s wiped (%d files)", self.path, removed)
            with open(registry + ".tmp", "w") as f:
                json.dump([*alive, self.pid], f)
            os.replace(registry + ".tmp", registry)

    def write(self, items: Iterable[Family]) -> None:
        for f in items:
            if f.type == "counter":
                for values, value in f.samples.items():
                    self._set(f, f.name + "_total", f.labels, values, value)
            elif f.type == "gauge":
                for values, value in f.samples.items():
                    self._set(f, f.name, f.labels, values, value)
            else:
                bucket_labels = (*f.labels, "le")
                for values, (counts, total) in f.samples.items():
                    for bound, count in zip(BUCKET_LABELS, counts, strict=True):
                        self._set(f, f.name + "_bucket", bucket_labels, (*values, bound), count)
                    self._set(f, f.name + "_sum", f.labels, values, total)

    def _set(
        self, f: Family, name: str, labels: tuple[str, ...], values: tuple[str, ...], value: float
    ) -> None:
        key = (name, values)
        slot = self.values.get(key)
        if slot is None:
            slot = self.values[key] = self.value_class(
                f.type, f.name, name, labels, values, f.doc, multiprocess_mode=f.mode
            )
        if slot.get() != value:
            slot.set(value)

    def want_status(self) -> None:
        """Someone watches the status page: every worker keeps history from now on (see `tick`)."""
        with open(os.path.join(self.path, self.STATUS_FILE), "a"):
            pass
        os.utime(os.path.join(self.path, self.STATUS_FILE))

    def status_wanted_at(self) -> float:
        try:
            return os.stat(os.path.join(self.path, self.STATUS_FILE)).st_mtime
        except FileNotFoundError:
            return 0.0

    def read(self) -> Iterable[Metric]:
        metrics: Iterable[Metric] = self.collector.collect()  # type: ignore[no-untyped-call]
        return metrics

    def close(self) -> None:
        """The worker is leaving: its live gauges (in-flight, up, state) stop counting."""
        mark_process_dead(self.pid, self.path)  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def lb_metrics(samples: Samples, pool: Pool, now: float | None = None) -> dict[str, Any]:
    """The `/lb-metrics` document (schema: lb-metrics.md), read from the Prometheus samples."""
    now = time.time() if now is None else now
    count = samples.total("lb_request_duration_seconds_count")
    latency = samples.total("lb_request_duration_seconds_sum")
    started = samples.find("lb_start_time_seconds") or now
    backends = []
    healthy = 0
    for b in pool.backends:
        up = samples.total("lb_backend_up", backend=b.url) > 0
        healthy += up
        in_state = [s for s in STATES if samples.total("lb_backend_state", backend=b.url, state=s) > 0]
        state = in_state[0] if len(in_state) == 1 else HEALTHY if up else UNHEALTHY
        backends.append(
            {
                "url": b.url,
                "state": state,
                "active_connections": int(samples.total("lb_backend_in_flight", backend=b.url)),
                "total_requests": int(samples.total("lb_backend_requests_total", backend=b.url)),
                "total_failures": int(samples.total("lb_backend_failures_total", backend=b.url)),
                "last_checked": _rfc3339(
                    samples.find("lb_backend_last_check_timestamp_seconds", backend=b.url)
                ),
            }
        )
    return {
        "uptime_seconds": round(now - started, 3),
        "total_requests": int(samples.total("lb_requests_received_total")),
        "success_requests": int(samples.total("lb_backend_responses_total")),
        "failed_requests": int(samples.total("lb_error_responses_total")),
        "retry_attempts": int(
            samples.total("lb_retries_total") - samples.total("lb_retries_total", reason=BUDGET_EXHAUSTED)
        ),
        "avg_latency_ms": round(latency / count * 1000, 3) if count else 0.0,
        "healthy_backends": healthy,
        "total_backends": len(pool.backends),
        "backends": backends,
    }


# --- the status page: rates and quantiles over the last minute -----------------------------------

Snapshot = dict[str, tuple[float, float, tuple[float, ...]]]  # url -> (requests, 5xx, cumulative buckets)


def snapshot(samples: Samples, pool: Pool) -> Snapshot:
    result: Snapshot = {}
    for b in pool.backends:
        buckets = samples.buckets("lb_request_duration_seconds", backend=b.url)
        result[b.url] = (
            samples.total("lb_requests_total", backend=b.url),
            samples.total("lb_requests_total", backend=b.url, code="5xx"),
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

    def rows(self, now: float, current: Snapshot) -> tuple[float, dict[str, dict[str, float | None]]]:
        """Per backend: requests per second, error ratio, p50 and p99 (ms) since the oldest point."""
        if not self.points:
            return 0.0, {url: _empty_row() for url in current}
        at, old = self.points[0]
        seconds = now - at
        result: dict[str, dict[str, float | None]] = {}
        for url, (requests, errors, buckets) in current.items():
            before = old.get(url, (0.0, 0.0, (0.0,) * len(buckets)))
            n = requests - before[0]
            delta = tuple(a - b for a, b in zip(buckets, before[2], strict=True))
            p50, p99 = quantile(0.5, BUCKETS, delta), quantile(0.99, BUCKETS, delta)
            result[url] = {
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

    def __init__(self, stats: Stats, pool: Pool, multiproc_dir: str | None = None) -> None:
        self.stats = stats
        self.pool = pool
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

    @property
    def multiprocess(self) -> bool:
        return self.store is not None

    def flush(self) -> None:
        """Write this worker's numbers to the value files (no-op with a single process)."""
        if self.store is not None:
            self.store.write(families(self.stats, self.pool))

    def collect(self) -> Iterable[Metric]:
        if self.store is None:
            return to_prometheus(families(self.stats, self.pool))
        self.flush()  # this worker is exact; the others are at most one flush interval behind
        return self.store.read()

    def samples(self) -> Samples:
        return Samples(self.collect())

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def lb_metrics(self) -> dict[str, Any]:
        return lb_metrics(self.samples(), self.pool)

    def tick(self) -> None:
        """Every flush interval: flush, and remember a point for the status page's window."""
        now = time.monotonic()
        if self.store is None:
            self.history.add(now, snapshot(self.samples(), self.pool))
            return
        self.flush()
        # Reading every worker's files costs a little: keep history only while someone watches.
        if time.time() - self.store.status_wanted_at() < 2 * WINDOW:
            self.history.add(now, snapshot(Samples(self.store.read()), self.pool))

    def status(self) -> dict[str, Any]:
        """The status page's data: every backend's state, weight, load and last-minute numbers."""
        now = time.monotonic()
        if self.store is not None and time.time() - self.store.status_wanted_at() > 1:
            self.store.want_status()
        samples = self.samples()
        current = snapshot(samples, self.pool)
        if not self.history.points:
            self.history.add(now, current)
        window, rows = self.history.rows(now, current)
        document = lb_metrics(samples, self.pool)
        backends = []
        for b, row in zip(document["backends"], (rows[b.url] for b in self.pool.backends), strict=True):
            weight = samples.find("lb_backend_weight", backend=b["url"])
            backends.append({**b, "weight": int(weight or 0), "in_flight": b["active_connections"], **row})
        return {
            "generated_at": _rfc3339(time.time()),
            "window_seconds": round(window, 1),
            "workers": "all" if self.store is not None else "this process",
            "uptime_seconds": document["uptime_seconds"],
            "total_requests": document["total_requests"],
            "in_flight": int(samples.total("lb_requests_in_flight")),
            "healthy_backends": document["healthy_backends"],
            "total_backends": document["total_backends"],
            "backends": backends,
        }

    def close(self) -> None:
        if self.store is not None:
            self.flush()
            self.store.close()


def multiproc_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
