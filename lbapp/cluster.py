"""Clusters: a pool and the policy balancing it, per route; the default pool is the route `/`.

`Clusters` is the one list that health checking, the metrics, the status page, readiness and
the admin API iterate, and the routes table the proxy asks for each request: the longest
matching prefix wins, and a prefix matches whole path segments (`/api` matches `/api`, `/api/`
and `/api/users`, not `/apis`; a prefix ending in `/` matches only below it). Requests matching
no other route go to the default cluster (`LB_BACKENDS`, `LB_ALGORITHM`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

from .admission import FULL, Full
from .backend import Backend
from .balancers import PolicyOptions, create_balancer
from .policy import Balancer, RequestInfo
from .pool import Pool
from .ratelimit import RateLimiter
from .settings import BackendSpec, RouteSpec, Settings


class Cluster:
    """One route: its prefix, its pool, its policy (with the policy's optional hooks looked up once)."""

    __slots__ = ("algorithm", "balancer", "limiter", "observe", "pool", "prefix", "raw_prefix",
                 "response_headers", "standby", "strip_prefix")  # fmt: skip

    def __init__(
        self,
        pool: Pool,
        balancer: Balancer,
        prefix: str = "/",
        strip_prefix: bool = False,
        algorithm: str = "",
    ) -> None:
        self.algorithm = algorithm  # the policy's name, as configured (a reload compares it)
        self.prefix = prefix
        self.raw_prefix = prefix.encode("ascii")
        self.pool = pool
        self.balancer = balancer
        self.strip_prefix = strip_prefix
        # None when the policy has no such hook: the proxy then skips the call (and its timing).
        self.observe = getattr(balancer, "observe", None)
        self.response_headers = getattr(balancer, "response_headers", None)
        self.standby = bool(getattr(balancer, "standby", False))
        self.limiter: RateLimiter | None = None  # the route's rate limit (ratelimit.attach_limiters)

    def __repr__(self) -> str:
        return f"<Cluster {self.prefix} {len(self.pool.backends)} backends>"

    def candidates(self) -> Sequence[Backend]:
        """The backends the policy may pick from (weight-0 standbys only for `first`)."""
        return self.pool.available if self.standby else self.pool.eligible

    def pick(self, request: RequestInfo, tried: set[Backend]) -> Backend | Full | None:
        """The policy's pick among the candidates below their cap; FULL when all are at it, None
        when there is none (all down)."""
        candidates = self.candidates()
        if not candidates:
            return None
        if tried:
            # Each retry goes to a backend not tried yet, when one exists.
            untried = [b for b in candidates if b not in tried]
            if untried:
                candidates = untried
        below = self.pool.below_cap(candidates)
        if isinstance(below, Full):
            return below
        return self.balancer.pick(below, request)

    async def admit(self, request: RequestInfo, tried: set[Backend]) -> Backend | Full | None:
        """`pick`, waiting in the pool's queue while every candidate is at its cap."""
        choice = self.pick(request, tried)
        if choice is FULL:
            choice = await self.pool.queue.wait(lambda: self.pick(request, tried))
        return choice

    def answered(self, backend: Backend, status: int, seconds: float) -> None:
        """Feedback for the pool's outlier detection and the policy: `backend` answered."""
        if self.observe is not None:
            self.observe(backend, seconds, True)
        if status in self.pool.outlier_statuses:
            self.pool.record_failure(backend, f"status {status}")
        else:
            backend.errors_in_row = 0

    def failed(self, backend: Backend, reason: str, seconds: float) -> None:
        """Feedback: an attempt on `backend` failed without an answer."""
        if self.observe is not None:
            self.observe(backend, seconds, False)
        self.pool.record_failure(backend, reason)

    def forget(self, backend: Backend) -> None:
        """`backend` left the pool or changed weight: a policy keeping state per backend (hash
        ring, smooth weights, sticky cookies, EWMA) drops it through its optional `forget` hook."""
        hook = getattr(self.balancer, "forget", None)
        if hook is not None:
            hook(backend)

    def policy_headers(self, backend: Backend, request: RequestInfo) -> list[tuple[bytes, bytes]] | None:
        """The policy's response headers for `backend` (e.g. sticky's Set-Cookie), if it has any."""
        return self.response_headers(backend, request) if self.response_headers is not None else None

    def matches(self, path: bytes) -> bool:
        prefix = self.raw_prefix
        if not path.startswith(prefix):
            return False
        return len(path) == len(prefix) or prefix.endswith(b"/") or path[len(prefix)] == 0x2F  # "/"

    def target(self, raw: bytes, routed: bytes) -> bytes:
        """The path to forward: the client's bytes, or the routed (dot-segment-normalised) path
        without the prefix (never empty)."""
        if not self.strip_prefix:
            return raw
        rest = routed[len(self.raw_prefix) :]
        return rest if rest.startswith(b"/") else b"/" + rest


class Clusters:
    """Every cluster, the default (`/`) first; `route` is the routes table, longest prefix first."""

    def __init__(self, default: Cluster, routes: Sequence[Cluster] = ()) -> None:
        self.replace(default, routes)

    def replace(self, default: Cluster, routes: Sequence[Cluster] = ()) -> None:
        """Swap the whole table at once (a reload): one synchronous step on the event loop."""
        self.default = default
        self.routes = sorted(routes, key=lambda cluster: len(cluster.prefix), reverse=True)
        self.all = [default, *routes]

    def get(self, prefix: str) -> Cluster | None:
        """The cluster of a route prefix ("/": the default one)."""
        return next((c for c in self.all if c.prefix == prefix), None)

    def __iter__(self) -> Iterator[Cluster]:
        return iter(self.all)

    def route(self, path: bytes) -> Cluster:
        """The cluster for a request path (without query)."""
        for cluster in self.routes:
            if cluster.matches(path):
                return cluster
        return self.default

    def find(self, url: str) -> list[tuple[Pool, Backend]]:
        """Every (pool, backend) with this URL: the same URL may serve several routes."""
        return [(c.pool, b) for c in self.all if (b := c.pool.find(url)) is not None]


def build_cluster(
    settings: Settings,
    sticky_secret: bytes,
    prefix: str = "/",
    specs: Sequence[BackendSpec] | None = None,
    algorithm: str | None = None,
    strip: bool = False,
) -> Cluster:
    """One cluster as configured: its pool (with the settings' health and outlier rules) and policy."""
    # Every sticky cookie has `Path=/`, so each route's gets its own name (suffixed by a hash
    # of the prefix, stable across restarts) lest it overwrite the default pool's.
    cookie = settings.sticky_cookie
    if prefix != "/":
        cookie += "-" + hashlib.blake2b(prefix.encode(), digest_size=3).hexdigest()
    options = PolicyOptions(settings.hash_key, cookie, sticky_secret)
    specs = settings.backends if specs is None else specs
    pool = Pool(
        [spec for spec in specs if spec.discovery is None],  # discovery.py adds the others
        route=prefix,
        healthy_threshold=settings.healthy_threshold,
        unhealthy_threshold=settings.unhealthy_threshold,
        outlier_failures=settings.outlier_consecutive_failures,
        outlier_statuses=settings.outlier_statuses,
        ejection_time=settings.outlier_ejection_time,
        max_ejection_time=settings.outlier_max_ejection_time,
        max_ejection_percent=settings.outlier_max_ejection_percent,
        slow_start=settings.slow_start,
        panic_threshold=settings.panic_threshold,
        max_conns=settings.backend_max_conns,
        queue_size=settings.queue_size,
        queue_timeout=settings.queue_timeout,
    )
    algorithm = algorithm or settings.algorithm
    return Cluster(pool, create_balancer(algorithm, options), prefix, strip, algorithm)


def build_route(settings: Settings, sticky_secret: bytes, spec: RouteSpec) -> Cluster:
    return build_cluster(
        settings, sticky_secret, spec.prefix, spec.backends, spec.algorithm, spec.strip_prefix
    )


def build_clusters(settings: Settings, sticky_secret: bytes) -> Clusters:
    """The default cluster from `LB_BACKENDS` and one per `LB_ROUTES` entry, as configured."""
    routes = [build_route(settings, sticky_secret, spec) for spec in settings.routes]
    return Clusters(build_cluster(settings, sticky_secret), routes)
