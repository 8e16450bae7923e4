"""Backends and their state: the one place that knows which backends may take traffic.

Counters here are plain ints mutated on the event loop (no locks: one loop per process);
`metrics.py` reads them at scrape time, so the hot path pays one integer add per event.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from urllib.parse import urlsplit

import httpx

from .settings import BackendSpec

logger = logging.getLogger("lbapp.pool")

HEALTHY = "healthy"
UNHEALTHY = "unhealthy"


class Backend:
    """One upstream server: where it is, what state it is in, and what it has done."""

    __slots__ = (
        "base_path",
        "checks_failed",
        "checks_passed",
        "consecutive_failures",
        "consecutive_successes",
        "ejections",
        "host_header",
        "in_flight",
        "index",
        "last_checked",
        "name",
        "origin",
        "state",
        "total_failures",
        "total_requests",
        "url",
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
        self.consecutive_successes = 0
        self.consecutive_failures = 0
        self.last_checked: datetime | None = None
        self.checks_passed = 0
        self.checks_failed = 0
        self.ejections = 0  # passive outlier detection (none yet); exported as lb_outlier_ejections

    def __repr__(self) -> str:
        return f"<Backend {self.url} {self.state}>"

    @property
    def healthy(self) -> bool:
        return self.state == HEALTHY


class Pool:
    """All configured backends, and the list of those eligible for new requests.

    `eligible`: healthy backends with a weight above 0, in configured order (what policies see).
    `available`: healthy backends including weight-0 standbys (what `first` sees).
    """

    def __init__(
        self, specs: Iterable[BackendSpec], healthy_threshold: int = 2, unhealthy_threshold: int = 2
    ):
        self.backends: list[Backend] = [Backend(spec, index) for index, spec in enumerate(specs)]
        self.healthy_threshold = healthy_threshold
        self.unhealthy_threshold = unhealthy_threshold
        self.eligible: Sequence[Backend] = ()
        self.available: Sequence[Backend] = ()
        self.refresh()

    def refresh(self) -> None:
        """Recompute the eligible lists; called on state changes, never per request."""
        self.available = tuple(b for b in self.backends if b.state == HEALTHY)
        self.eligible = tuple(b for b in self.available if b.weight > 0)

    def record_check(self, backend: Backend, ok: bool, reason: str = "") -> None:
        """Apply one active health-check result with rise/fall thresholds (no flapping)."""
        backend.last_checked = datetime.now(UTC)
        if ok:
            backend.checks_passed += 1
            backend.consecutive_failures = 0
            backend.consecutive_successes += 1
            if backend.state != HEALTHY and backend.consecutive_successes >= self.healthy_threshold:
                self._set_state(backend, HEALTHY, f"{backend.consecutive_successes} checks passed")
        else:
            backend.checks_failed += 1
            backend.consecutive_successes = 0
            backend.consecutive_failures += 1
            if backend.state == HEALTHY and backend.consecutive_failures >= self.unhealthy_threshold:
                self._set_state(backend, UNHEALTHY, f"{backend.consecutive_failures} checks failed: {reason}")

    def _set_state(self, backend: Backend, state: str, reason: str) -> None:
        level = logging.INFO if state == HEALTHY else logging.WARNING
        logger.log(level, "backend %s is now %s (%s)", backend.url, state, reason)
        backend.state = state
        self.refresh()
