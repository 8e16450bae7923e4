"""Metrics: plain counters on the hot path, every view built from them at read time.

The proxy only adds to ints (on `Stats` and on each `Backend`). `families()` turns those numbers
into a list of `Family` records; from there, one way each:

- Prometheus `/metrics`: `to_prometheus()` (one process) or, with `PROMETHEUS_MULTIPROC_DIR`,
  `multiproc.MultiprocessStore` writes every worker's families to prometheus-client's value files
  and prometheus-client's `MultiProcessCollector` sums them;
- `/lb-metrics` and the status page read the *Prometheus families* back (`views.Samples`), so the
  two views can never disagree: one source of truth.

No prometheus-client metric object is touched per request (they take a lock on every `inc`).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from .backend import STATES, Backend
from .cluster import Clusters

# Upper bounds (seconds) of the latency histogram: 1 ms to 10 s, roughly x2.5 apart.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BUCKET_LABELS = (*(repr(b) for b in BUCKETS), "+Inf")  # as prometheus-client writes them
# Label values are bounded: an unknown method is "OTHER", a status is its class.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"})
CODE_CLASSES = ("5xx", "1xx", "2xx", "3xx", "4xx", "5xx")
NO_BACKEND = "none"  # the `route` and `backend` labels of requests answered without a backend
ERROR_KINDS = ("connect", "timeout", "reset", "protocol")
BUDGET_EXHAUSTED = "budget_exhausted"  # lb_retries_total reason: a retry the budget refused
RETRY_REASONS = (*ERROR_KINDS, BUDGET_EXHAUSTED)
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

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
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
        "durations",
        "in_flight",
        "lb_errors",
        "requests",
        "retries",
        "sources",
        "started",
        "success",
        "upstream_errors",
    )

    def __init__(self) -> None:
        self.started = time.time()
        # More families, from other parts (e.g. wsmetrics.WebSocketStats), given the backend labels.
        self.sources: list[Callable[[list[tuple[str, str]]], list[Family]]] = []
        self.requests = 0  # received by the proxy route
        self.in_flight = 0
        self.success = 0  # answered with a backend's response
        self.lb_errors: dict[int, int] = {}  # answered by the load balancer itself, by status
        self.retries: dict[str, int] = {}  # by the kind of the failure that caused them
        self.answered: dict[tuple[str, str, str, str], int] = {}  # (route, backend, method, code class)
        self.durations: dict[tuple[str, str], Histogram] = {}  # by (route, backend)
        self.bytes_in: dict[tuple[str, str], int] = {}
        self.bytes_out: dict[tuple[str, str], int] = {}
        self.upstream_errors: dict[tuple[str, str, str], int] = {}  # (route, backend, kind)

    def begin(self) -> None:
        self.requests += 1
        self.in_flight += 1

    def end(self, backend: Backend | None, method: str, status: int, tap: Tapped, started: float) -> None:
        """One client request is over (answered, failed or abandoned): count it once."""
        self.in_flight -= 1
        label = (backend.route, backend.url) if backend is not None else (NO_BACKEND, NO_BACKEND)
        key = (*label, method if method in METHODS else "OTHER", code_class(status))
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

    def observe_response(self) -> None:
        """A backend's response headers went to the client."""
        self.success += 1

    def observe_error(self, status: int) -> None:
        """The load balancer answered with its own error (502/503/504)."""
        self.lb_errors[status] = self.lb_errors.get(status, 0) + 1

    def upstream_error(self, backend: Backend, error: BaseException) -> None:
        """An attempt to `backend` failed (before or during its response)."""
        backend.total_failures += 1
        key = (backend.route, backend.url, error_kind(error))
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
    `buckets` are a histogram's upper bounds as prometheus-client writes them.
    """

    name: str
    doc: str
    type: str
    labels: tuple[str, ...] = ()
    mode: str = ""
    samples: dict[tuple[str, ...], Any] = field(default_factory=dict)
    buckets: tuple[str, ...] = BUCKET_LABELS


def families(stats: Stats, clusters: Clusters) -> list[Family]:
    """Every aggregated metric of this process, read from the hot path's ints, for every route."""
    backends = [b for cluster in clusters for b in cluster.pool.backends]
    eligible = {b for cluster in clusters for b in cluster.pool.eligible}
    labels = [(b.route, b.url) for b in backends]
    rl_errors = sum(c.limiter.errors for c in clusters if c.limiter is not None)
    by = ("route", "backend")

    def per_backend(name: str, doc: str, type_: str, values: Iterable[float], mode: str = "") -> Family:
        return Family(name, doc, type_, by, mode, dict(zip(labels, values, strict=True)))

    requests = Family(
        "lb_requests",
        "Client requests finished, by the route and backend that answered or was tried last (none: no"
        " backend), method and status class.",
        "counter",
        (*by, "method", "code"),
    )
    requests.samples = {key: value for key, value in stats.answered.items()}
    durations = Family(
        "lb_request_duration_seconds", "Time from request received to response headers sent.", "histogram", by
    )
    durations.samples = {key: (h.counts, h.sum) for key, h in stats.durations.items()}
    upstream_errors = Family(
        "lb_upstream_errors",
        "Failed upstream attempts by kind (connect, timeout, reset, protocol).",
        "counter",
        (*by, "kind"),
    )
    upstream_errors.samples = {
        (*label, k): stats.upstream_errors.get((*label, k), 0) for label in labels for k in ERROR_KINDS
    }
    checks = Family(
        "lb_health_checks", "Active health checks by result (pass, fail).", "counter", (*by, "result")
    )
    for b in backends:
        checks.samples[(b.route, b.url, "pass")] = b.checks_passed
        checks.samples[(b.route, b.url, "fail")] = b.checks_failed
    state = Family(
        "lb_backend_state", "1 for the state the backend is in.", "gauge", (*by, "state"), "livemax"
    )
    state.samples = {(b.route, b.url, s): int(b.state == s) for b in backends for s in STATES}
    last_checked = Family(
        "lb_backend_last_check_timestamp_seconds",
        "Unix time of the last active health check.",
        "gauge",
        by,
        "max",
    )
    last_checked.samples = {(b.route, b.url): b.last_checked.timestamp() for b in backends if b.last_checked}

    return [
        Family("lb_requests_received", "Client requests received by the proxy route.", "counter",
               samples={(): stats.requests}),
        requests,
        Family("lb_backend_responses", "Client requests answered with a backend's response.", "counter",
               samples={(): stats.success}),
        Family("lb_error_responses", "Client requests answered by the load balancer's own error.",
               "counter", ("code",), samples={(str(c),): stats.lb_errors.get(c, 0) for c in LB_ERROR_CODES}),
        durations,
        Family("lb_request_bytes", "Request body bytes received from clients.", "counter", by,
               samples={k: v for k, v in stats.bytes_in.items()}),
        Family("lb_response_bytes", "Response body bytes sent to clients.", "counter", by,
               samples={k: v for k, v in stats.bytes_out.items()}),
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
        Family("lb_rate_limited", "Requests refused by rate limiting, by route.", "counter", ("route",),
               samples={(c.prefix,): c.limiter.refused for c in clusters if c.limiter} or {("/",): 0}),
        Family("lb_rate_limit_errors", "Rate-limit store failures.", "counter", samples={(): rl_errors}),
        Family("lb_start_time_seconds", "Unix time the load balancer started.", "gauge", (), "min",
               {(): stats.started}),
        *(f for source in stats.sources for f in source(labels)),
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
                for bound, count in zip(f.buckets, counts, strict=True):
                    acc += count
                    buckets.append((bound, acc))
                metric.add_metric(values, buckets, total)
        yield metric
