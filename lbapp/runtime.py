"""Runtime changes to the clusters: add, remove (drain, then drop) and re-weight backends.

The admin API (admin.py) and configuration reloads (reload.py) change the pools only through
`Runtime`, so every change follows the same rules:

- a new backend joins out of rotation and takes traffic once a health check passes (the checker
  is woken to probe it at once);
- a removed backend drains: no new requests, and it leaves the pool once its in-flight requests
  are done or `LB_DRAIN_TIMEOUT` has passed (requests still running then are not cut: they
  finish on their own, bounded by the upstream timeouts); its metric series go with it;
- a weight change takes effect for the next pick; policies that keep state per backend are
  told (`Cluster.forget`).

Each change is checked completely before anything is touched (`ChangeError`: status + message),
and applied in one synchronous step on the event loop, so no request sees half of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from .backend import Backend
from .cluster import Cluster, Clusters
from .health import HealthChecker
from .metrics import Stats
from .settings import BackendSpec

logger = logging.getLogger("lbapp.runtime")
MAX_WEIGHT = 1_000_000


class ChangeError(Exception):
    """A change that cannot be made: the HTTP status and a one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def check_url(url: Any) -> str:
    """A backend URL as the settings accept it (scheme, host, no query), normalised."""
    if not isinstance(url, str) or not url.strip():
        raise ChangeError(400, "url: expected a backend URL such as http://10.0.0.5:8000")
    try:
        return BackendSpec(url=url).url
    except ValidationError as exc:
        raise ChangeError(400, f"url: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None


def check_weight(weight: Any) -> int:
    if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= MAX_WEIGHT:
        raise ChangeError(400, f"weight: expected an integer from 0 to {MAX_WEIGHT}")
    return weight


def describe(cluster: Cluster, backend: Backend) -> dict[str, Any]:
    return {
        "url": backend.url,
        "weight": backend.weight,
        "state": backend.state,
        "in_flight": backend.in_flight,
        "route": cluster.prefix,
    }


def drop_series(stats: Stats, backend: Backend) -> None:
    """Forget a removed backend's per-backend counters: its series leave `/metrics`."""
    label = (backend.route, backend.url)
    for key in [k for k in stats.answered if k[:2] == label]:
        del stats.answered[key]
    for error_key in [k for k in stats.upstream_errors if k[:2] == label]:
        del stats.upstream_errors[error_key]
    stats.durations.pop(label, None)
    stats.bytes_in.pop(label, None)
    stats.bytes_out.pop(label, None)


class Runtime:
    """Changes the live clusters; one per process, on its event loop."""

    def __init__(
        self, clusters: Clusters, health: HealthChecker, stats: Stats, drain_timeout: float = 30.0
    ) -> None:
        self.clusters = clusters
        self.health = health
        self.stats = stats
        self.drain_timeout = drain_timeout
        self.removing: dict[Backend, asyncio.Task[None]] = {}
        self.on_change: Callable[[], None] | None = None  # tells the other workers (layout.py)
        self.on_sync: Callable[[], None] | None = None  # takes their latest changes (layout.py)

    def sync(self) -> None:
        """Before a change: apply the other workers' latest one, so that it is built upon, not lost."""
        if self.on_sync is not None:
            self.on_sync()

    def changed(self) -> None:
        """A change was made here (admin API, reload): share it."""
        if self.on_change is not None:
            self.on_change()

    def backends(self) -> list[dict[str, Any]]:
        return [describe(c, b) for c in self.clusters for b in c.pool.backends]

    def cluster(self, route: Any) -> Cluster:
        if route is None:
            return self.clusters.default
        if not isinstance(route, str) or self.clusters.get(route) is None:
            known = ", ".join(c.prefix for c in self.clusters)
            raise ChangeError(404, f"route: no route {route!r} (routes: {known})")
        cluster = self.clusters.get(route)
        assert cluster is not None
        return cluster

    def found(self, url: Any, route: Any = None) -> list[tuple[Cluster, Backend]]:
        """Every (cluster, backend) with this URL, in one route when `route` is given; 404 if none."""
        url = check_url(url)
        clusters = [self.cluster(route)] if route is not None else list(self.clusters)
        found = [(c, b) for c in clusters if (b := c.pool.find(url)) is not None]
        if not found:
            raise ChangeError(404, f"no backend {url}" + (f" in route {route}" if route else ""))
        return found

    # --- the changes ------------------------------------------------------------------------------

    def add(self, url: Any, weight: Any = 1, route: Any = None) -> tuple[Cluster, Backend]:
        url, weight, cluster = check_url(url), check_weight(weight), self.cluster(route)
        existing = cluster.pool.find(url)
        if existing is not None and existing not in self.removing:
            raise ChangeError(409, f"backend {url} is already in route {cluster.prefix}")
        if existing is not None:  # being removed: the same backend stays, with its state
            self.keep(cluster, existing)
            self.set_weight(cluster, existing, weight)
            return cluster, existing
        backend = cluster.pool.add(url, weight)
        self.health.wake()
        return cluster, backend

    def remove(self, cluster: Cluster, backend: Backend, why: str = "removed through the admin API") -> None:
        """Drain `backend`, then drop it once idle or after the drain timeout."""
        if backend in self.removing:
            return
        cluster.pool.drain(backend, why)
        self.removing[backend] = asyncio.get_running_loop().create_task(
            self._remove_when_idle(cluster, backend), name=f"lbapp-drain {backend.url}"
        )

    def keep(self, cluster: Cluster, backend: Backend) -> None:
        """A backend being removed is wanted again: stop its removal, end its drain."""
        task = self.removing.pop(backend, None)
        if task is not None:
            task.cancel()
            cluster.pool.undrain(backend, "wanted again")

    def set_weight(self, cluster: Cluster, backend: Backend, weight: int) -> None:
        if backend.weight == weight:
            return
        logger.info(
            "backend %s in route %s: weight %d -> %d", backend.url, cluster.prefix, backend.weight, weight
        )
        backend.weight = weight
        cluster.forget(backend)
        cluster.pool.refresh()

    async def _remove_when_idle(self, cluster: Cluster, backend: Backend) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_timeout
        try:
            # Polled, off the hot path, so that `Pool.release` stays a plain decrement.
            while backend.in_flight > 0 and loop.time() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            if backend.in_flight:
                logger.warning(
                    "backend %s: LB_DRAIN_TIMEOUT (%gs) over with %d requests in flight; removing it "
                    "(they finish on their own)",
                    backend.url,
                    self.drain_timeout,
                    backend.in_flight,
                )
            self.drop(cluster, backend)
        finally:
            if self.removing.get(backend) is asyncio.current_task():
                del self.removing[backend]

    def drop(self, cluster: Cluster, backend: Backend) -> None:
        """Out of the pool, the policy, the health checks and the metrics."""
        cluster.pool.remove(backend)
        cluster.forget(backend)
        self.health.forget(backend)
        drop_series(self.stats, backend)

    async def aclose(self) -> None:
        """Shutdown: pending removals are moot."""
        for task in list(self.removing.values()):
            task.cancel()
        for task in list(self.removing.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task
