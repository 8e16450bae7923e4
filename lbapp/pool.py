"""Backends and their state: the one place that knows which backends may take traffic.

Counters here are plain ints mutated on the event loop (no locks: one loop per process);
`metrics.py` reads them at scrape time, so the hot path pays one integer add per event.

A backend's state is derived from three independent facts, so that none of them can undo
another by accident:

- `check_ok`: the active health checks' verdict, with rise/fall thresholds (`record_check`);
- `ejected_until`: passive outlier detection took it out until then (`record_failure`, `eject`);
- `draining`: the operator asked for no new requests (`drain`).

    draining  if draining
    unhealthy elif not check_ok
    ejected   elif ejected_until
    healthy   otherwise

State changes are rare: each one is logged once and recomputes the eligible tuples (`refresh`),
so the proxy never scans the pool per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from urllib.parse import urlsplit

import httpx

from .settings import BackendSpec, Settings, parse_statuses

logger = logging.getLogger("lbapp.pool")

HEALTHY = "healthy"
UNHEALTHY = "unhealthy"
EJECTED = "ejected"
DRAINING = "draining"
STATES = (HEALTHY, UNHEALTHY, EJECTED, DRAINING)
SLOW_START_FLOOR = 0.1  # a backend in slow start begins at this share of its weight

Waiters = deque["asyncio.Future[None]"]


class Backend:
    """One upstream server: where it is, what state it is in, and what it has done."""

    __slots__ = (
        "base_path",
        "check_ok",
        "checks_failed",
        "checks_passed",
        "clock",
        "consecutive_failures",
        "consecutive_successes",
        "draining",
        "eject_streak",
        "ejected_until",
        "ejections",
        "errors_in_row",
        "host_header",
        "in_flight",
        "index",
        "last_checked",
        "last_returned",
        "name",
        "origin",
        "ramp_from",
        "ramp_until",
        "state",
        "total_failures",
        "total_requests",
        "transitions",
        "url",
        "waiters",
        "weight",
    )

    def __init__(self, spec: BackendSpec, index: int = 0) -> None:
        parts = urlsplit(spec.url)
        self.url = spec.url
        self.name = spec.url
        self.weight = spec.weight
        self.index = index
        # Parsed once: the proxy joins `base_path` and the client's raw target per request.
        self.origin = httpx.URL(f"{parts.scheme}://{parts.netloc}/")
        self.base_path = parts.path.rstrip("/").encode("ascii")
        self.host_header = parts.netloc.encode("ascii")
        self.state = HEALTHY
        self.in_flight = 0
        self.total_requests = 0
        self.total_failures = 0
        # Active checks (rise/fall).
        self.check_ok = True
        self.consecutive_successes = 0
        self.consecutive_failures = 0
        self.last_checked: datetime | None = None
        self.checks_passed = 0
        self.checks_failed = 0
        # Passive outlier detection.
        self.errors_in_row = 0  # failed attempts in a row (reset by any good answer)
        self.ejected_until = 0.0  # clock time; 0 = not ejected
        self.eject_streak = 0  # ejections in a row: the ejection time doubles with each
        self.last_returned = 0.0
        self.ejections = 0  # exported as lb_outlier_ejections_total
        self.draining = False
        self.transitions = 0  # state changes, for tests and curiosity
        # Slow start: weight ramps from SLOW_START_FLOOR to full between these (0 = no ramp).
        self.ramp_from = 0.0
        self.ramp_until = 0.0
        self.clock: Callable[[], float] = time.monotonic
        # The pool's circuit-breaker queue, shared by all its backends (see `wake_one`).
        self.waiters: Waiters = deque()

    def __repr__(self) -> str:
        return f"<Backend {self.url} {self.state}>"

    @property
    def healthy(self) -> bool:
        return self.state == HEALTHY

    def ramp_weight(self, now: float | None = None) -> float:
        """The effective weight: ramping during slow start, else the configured weight.

        Policies call it only when `ramp_until` is set, so a pool without slow start pays one
        attribute test per weight read.
        """
        until = self.ramp_until
        if not until:
            return self.weight
        now = self.clock() if now is None else now
        if now >= until:
            self.ramp_until = 0.0  # the ramp is over: back to the plain weight for good
            return self.weight
        progress = max(now - self.ramp_from, 0.0) / (until - self.ramp_from)
        return self.weight * (SLOW_START_FLOOR + (1.0 - SLOW_START_FLOOR) * progress)


def effective_weight(backend: Backend) -> float:
    return backend.weight if not backend.ramp_until else backend.ramp_weight()


def wake_one(waiters: Waiters) -> None:
    """A backend's in-flight count dropped: let the first waiting request try again."""
    while waiters:
        waiter = waiters.popleft()
        if not waiter.done():
            waiter.set_result(None)
            return


class Pool:
    """All configured backends, and the list of those eligible for new requests.

    `eligible`: healthy backends with a weight above 0, in configured order (what policies see).
    `available`: healthy backends including weight-0 standbys (what `first` sees).
    In panic mode (fewer than `panic_threshold` percent eligible) both hold every backend that
    is not draining.
    """

    def __init__(
        self,
        specs: Iterable[BackendSpec],
        healthy_threshold: int = 2,
        unhealthy_threshold: int = 2,
        *,
        outlier_failures: int = 0,
        outlier_statuses: Iterable[int] = (),
        ejection_time: float = 30.0,
        max_ejection_time: float = 300.0,
        max_ejection_percent: int = 50,
        slow_start: float = 0.0,
        panic_threshold: int = 0,
        max_conns: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.backends: list[Backend] = [Backend(spec, index) for index, spec in enumerate(specs)]
        self.healthy_threshold = healthy_threshold
        self.unhealthy_threshold = unhealthy_threshold
        self.outlier_failures = outlier_failures  # 0: passive outlier detection off
        self.outlier_statuses = frozenset(outlier_statuses)
        self.ejection_time = ejection_time
        self.max_ejection_time = max_ejection_time
        self.max_ejection_percent = max_ejection_percent
        self.slow_start = slow_start
        self.panic_threshold = panic_threshold
        self.max_conns = max_conns  # per-backend in-flight cap, 0 = unlimited
        self.clock = clock
        self.waiters: Waiters = deque()
        self.panic = False
        self._cap_logged = False
        for backend in self.backends:
            backend.clock = clock
            backend.waiters = self.waiters
        self.eligible: Sequence[Backend] = ()
        self.available: Sequence[Backend] = ()
        self.refresh()

    @classmethod
    def from_settings(cls, specs: Iterable[BackendSpec], settings: Settings) -> Pool:
        return cls(
            specs,
            settings.healthy_threshold,
            settings.unhealthy_threshold,
            outlier_failures=settings.outlier_consecutive_failures,
            outlier_statuses=parse_statuses(settings.outlier_statuses),
            ejection_time=settings.outlier_ejection_time,
            max_ejection_time=settings.outlier_max_ejection_time,
            max_ejection_percent=settings.outlier_max_ejection_percent,
            slow_start=settings.slow_start,
            panic_threshold=settings.panic_threshold,
            max_conns=settings.backend_max_conns,
        )

    def refresh(self) -> None:
        """Recompute the eligible lists; called on state changes, never per request."""
        available = tuple(b for b in self.backends if b.state == HEALTHY)
        eligible = tuple(b for b in available if b.weight > 0)
        panic = False
        if self.panic_threshold:
            candidates = tuple(b for b in self.backends if b.state != DRAINING)
            weighted = tuple(b for b in candidates if b.weight > 0)
            if weighted and len(eligible) * 100 < self.panic_threshold * len(weighted):
                panic = True
                available, eligible = candidates, weighted
        if panic != self.panic:
            if panic:
                logger.warning(
                    "panic mode: fewer than %d%% of the backends are healthy; balancing over all %d",
                    self.panic_threshold,
                    len(eligible),
                )
            else:
                logger.info("panic mode over: enough backends are healthy again")
            self.panic = panic
        self.available = available
        self.eligible = eligible
        # Requests queued by the circuit breaker look again, in order (each wakes the next).
        if self.waiters:
            wake_one(self.waiters)

    # --- active checks -------------------------------------------------------------------------

    def record_check(self, backend: Backend, ok: bool, reason: str = "") -> None:
        """Apply one active health-check result with rise/fall thresholds (no flapping)."""
        backend.last_checked = datetime.now(UTC)
        if ok:
            backend.checks_passed += 1
            backend.consecutive_failures = 0
            backend.consecutive_successes += 1
            if not backend.check_ok and backend.consecutive_successes >= self.healthy_threshold:
                backend.check_ok = True
                if backend.ejected_until:
                    # Checks just proved a recovery: an ejection from the failure is over too.
                    backend.ejected_until = 0.0
                    backend.last_returned = self.clock()
                    backend.errors_in_row = 0
                self._update(backend, f"{backend.consecutive_successes} checks passed")
        else:
            backend.checks_failed += 1
            backend.consecutive_successes = 0
            backend.consecutive_failures += 1
            if backend.check_ok and backend.consecutive_failures >= self.unhealthy_threshold:
                backend.check_ok = False
                self._update(backend, f"{backend.consecutive_failures} checks failed: {reason}")

    # --- passive checks (outlier detection) -----------------------------------------------------

    def record_failure(self, backend: Backend, reason: str) -> None:
        """A real request to `backend` failed (connect error, timeout, a status in the list)."""
        backend.errors_in_row += 1
        if (
            self.outlier_failures
            and backend.errors_in_row >= self.outlier_failures
            and backend.state == HEALTHY
        ):
            self.eject(backend, f"{backend.errors_in_row} failed requests in a row, last: {reason}")

    def eject(self, backend: Backend, reason: str) -> bool:
        """Take `backend` out for the ejection time (doubling on repeats), within the max share."""
        if backend.ejected_until:
            return False
        ejected = sum(1 for b in self.backends if b.ejected_until)
        if (ejected + 1) * 100 > self.max_ejection_percent * len(self.backends):
            backend.errors_in_row = 0  # count afresh rather than re-trying on every failure
            if not self._cap_logged:
                self._cap_logged = True
                logger.warning(
                    "not ejecting backend %s (%s): %d of %d backends already ejected, the most "
                    "LB_OUTLIER_MAX_EJECTION_PERCENT=%d%% allows",
                    backend.url,
                    reason,
                    ejected,
                    len(self.backends),
                    self.max_ejection_percent,
                )
            return False
        now = self.clock()
        if backend.last_returned and now - backend.last_returned > self.max_ejection_time:
            backend.eject_streak = 0  # well-behaved long enough: the next ejection is short again
        backend.eject_streak += 1
        duration = min(self.ejection_time * 2 ** (backend.eject_streak - 1), self.max_ejection_time)
        backend.ejected_until = now + duration
        backend.ejections += 1
        backend.errors_in_row = 0
        self._update(backend, f"{reason}; ejected for {duration:g}s")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (unit tests): `expire_ejections` does it
            return True
        loop.call_later(duration, self._return, backend, backend.ejected_until)
        return True

    def _return(self, backend: Backend, until: float) -> None:
        if backend.ejected_until == until:  # not returned and re-ejected in the meantime
            self.uneject(backend, "ejection time over")

    def uneject(self, backend: Backend, reason: str) -> None:
        if not backend.ejected_until:
            return
        backend.ejected_until = 0.0
        backend.last_returned = self.clock()
        backend.errors_in_row = 0
        self._cap_logged = False
        self._update(backend, reason)

    def expire_ejections(self, now: float | None = None) -> None:
        """Return every backend whose ejection time is over (the timer's safety net)."""
        now = self.clock() if now is None else now
        for backend in self.backends:
            if backend.ejected_until and backend.ejected_until <= now:
                self.uneject(backend, "ejection time over")

    # --- draining -------------------------------------------------------------------------------

    def drain(self, backend: Backend, reason: str = "drained through the admin API") -> None:
        backend.draining = True
        self._update(backend, reason)

    def undrain(self, backend: Backend, reason: str = "undrained through the admin API") -> None:
        backend.draining = False
        self._update(backend, reason)

    # --- the state -----------------------------------------------------------------------------

    def _update(self, backend: Backend, reason: str) -> None:
        """Derive the state from the three facts; log and refresh only when it changed."""
        if backend.draining:
            state = DRAINING
        elif not backend.check_ok:
            state = UNHEALTHY
        elif backend.ejected_until:
            state = EJECTED
        else:
            state = HEALTHY
        previous = backend.state
        if state == previous:
            return
        level = logging.INFO if state == HEALTHY else logging.WARNING
        logger.log(level, "backend %s is now %s, was %s (%s)", backend.url, state, previous, reason)
        backend.state = state
        backend.transitions += 1
        if state == HEALTHY and self.slow_start:
            now = self.clock()
            backend.ramp_from, backend.ramp_until = now, now + self.slow_start
        elif state != HEALTHY:
            backend.ramp_until = 0.0
        self.refresh()

    def find(self, url: str) -> Backend | None:
        url = url.strip().rstrip("/")
        return next((b for b in self.backends if b.url == url), None)
