"""A pool: the backends of one cluster, the rules that change their state, and admission.

The pool is the one place that knows which backends may take traffic, and how many requests each
holds. A backend's state is derived from three independent facts, so that none of them can undo
another by accident:

- `check_ok`: the active health checks' verdict, with rise/fall thresholds (`record_check`);
- `ejected_until`: passive outlier detection took it out until then (`record_failure`, `eject`);
- `draining`: the operator asked for no new requests (`drain`).

    draining  if draining
    unhealthy elif not check_ok
    ejected   elif ejected_until
    healthy   otherwise

State changes are rare: each one is logged once and recomputes the eligible tuples (`refresh`),
so the proxy never scans the pool per request. Admission: `lease` and `release` are the only
places a backend's in-flight count changes; with `max_conns` (circuit breaking) a request that
finds every candidate at its cap waits in the pool's `queue` (admission.py) for a released slot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Protocol

from .admission import FULL, Full, WaitQueue
from .backend import DRAINING, EJECTED, HEALTHY, UNHEALTHY, Backend

logger = logging.getLogger("lbapp.pool")


class BackendSpec(Protocol):
    """What a pool is built from (settings.BackendSpec is one)."""

    @property
    def url(self) -> str: ...
    @property
    def weight(self) -> int: ...


class Pool:
    """The backends of one cluster, and the lists of those eligible for new requests.

    `eligible`: healthy backends with a weight above 0, in configured order (what policies see).
    `available`: healthy backends including weight-0 standbys (what `first` sees).
    In panic mode (fewer than `panic_threshold` percent eligible) both hold every backend that
    is not draining.
    """

    def __init__(
        self,
        specs: Iterable[BackendSpec],
        *,
        route: str = "/",
        healthy_threshold: int = 2,
        unhealthy_threshold: int = 2,
        outlier_failures: int = 0,
        outlier_statuses: Iterable[int] = (),
        ejection_time: float = 30.0,
        max_ejection_time: float = 300.0,
        max_ejection_percent: int = 50,
        slow_start: float = 0.0,
        panic_threshold: int = 0,
        max_conns: int = 0,
        queue_size: int = 100,
        queue_timeout: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.route = route
        self.backends: list[Backend] = [
            Backend(spec.url, spec.weight, index, route, clock) for index, spec in enumerate(specs)
        ]
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
        self.queue = WaitQueue(queue_size, queue_timeout)  # requests waiting for a slot
        self.panic = False
        self._cap_logged = False
        self.eligible: Sequence[Backend] = ()
        self.available: Sequence[Backend] = ()
        self.refresh()

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
                    "panic mode in route %s: fewer than %d%% of the backends are healthy; balancing "
                    "over all %d",
                    self.route,
                    self.panic_threshold,
                    len(eligible),
                )
            else:
                logger.info("panic mode over in route %s: enough backends are healthy again", self.route)
            self.panic = panic
        self.available = available
        self.eligible = eligible
        # Requests queued by the circuit breaker look again, in order (each wakes the next).
        self.queue.wake_one()

    # --- admission -----------------------------------------------------------------------------

    def lease(self, backend: Backend) -> None:
        """An attempt on `backend` begins: it holds one of its slots until `release`."""
        backend.total_requests += 1
        backend.in_flight += 1

    def release(self, backend: Backend) -> None:
        """The attempt is over (answered, failed or abandoned): free its slot for a waiter."""
        backend.in_flight -= 1
        if self.queue.waiters:
            self.queue.wake_one()

    def below_cap(self, candidates: Sequence[Backend]) -> Sequence[Backend] | Full:
        """Circuit breaking: the candidates below `max_conns`, FULL when none is."""
        cap = self.max_conns
        if not cap:
            return candidates
        below = [b for b in candidates if b.in_flight < cap]
        if not below:
            return FULL
        return below if len(below) < len(candidates) else candidates

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

    # --- membership (the admin API, reloads) -------------------------------------------------
    def add(self, url: str, weight: int) -> Backend:
        """A new backend, out of rotation until its first passing health check (Envoy's rule
        for new hosts; after a failed one the usual rise threshold applies)."""
        index = max((b.index for b in self.backends), default=-1) + 1
        backend = Backend(url, weight, index, self.route, self.clock)
        backend.check_ok, backend.state = False, UNHEALTHY
        backend.consecutive_successes = self.healthy_threshold - 1
        self.backends.append(backend)
        logger.info("backend %s added to route %s, joins once a check passes", url, self.route)
        self.refresh()
        return backend

    def remove(self, backend: Backend) -> None:
        """Take `backend` out of the pool for good (the caller drained it first)."""
        if backend in self.backends:
            self.backends.remove(backend)
            logger.info("backend %s removed from route %s", backend.url, self.route)
            self.refresh()

    def find(self, url: str) -> Backend | None:
        url = url.strip().rstrip("/")
        return next((b for b in self.backends if b.url == url), None)
