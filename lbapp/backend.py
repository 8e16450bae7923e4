"""One upstream server: where it is, the facts its state is derived from, and what it has done.

Counters are plain ints mutated on the event loop (one loop per process, so no locks); the pool
owns the rules that change them, and `metrics.py` reads them at scrape time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from urllib.parse import urlsplit

import httpx

from .transport import origin_key

HEALTHY = "healthy"
UNHEALTHY = "unhealthy"
EJECTED = "ejected"
DRAINING = "draining"
STATES = (HEALTHY, UNHEALTHY, EJECTED, DRAINING)
SLOW_START_FLOOR = 0.1  # a backend in slow start begins at this share of its weight


class Backend:
    """One upstream server of a pool (the same URL in two routes is two `Backend`s)."""

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
        "origin",
        "origin_key",
        "ramp_from",
        "ramp_until",
        "route",
        "state",
        "total_failures",
        "total_requests",
        "transitions",
        "url",
        "weight",
    )

    def __init__(
        self,
        url: str,
        weight: int = 1,
        index: int = 0,
        route: str = "/",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        parts = urlsplit(url)
        self.url = url
        self.weight = weight
        self.index = index  # position in the configured list: a stable tie-breaker for policies
        self.route = route  # the prefix of the cluster this backend serves ("/": the default pool)
        # Parsed once: the proxy joins `base_path` and the client's raw target per request.
        self.origin = httpx.URL(f"{parts.scheme}://{parts.netloc}/")
        self.origin_key = origin_key(self.origin)
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
        self.clock = clock

    def __repr__(self) -> str:
        return f"<Backend {self.url} {self.state}>"

    @property
    def healthy(self) -> bool:
        return self.state == HEALTHY

    def effective_weight(self) -> float:
        """The weight policies balance by: ramping during slow start, else the configured one.

        Outside slow start this is one attribute test; the ramp ends itself once its time is over.
        """
        until = self.ramp_until
        if not until:
            return self.weight
        now = self.clock()
        if now >= until:
            self.ramp_until = 0.0  # the ramp is over: back to the plain weight for good
            return self.weight
        progress = max(now - self.ramp_from, 0.0) / (until - self.ramp_from)
        return self.weight * (SLOW_START_FLOOR + (1.0 - SLOW_START_FLOOR) * progress)
