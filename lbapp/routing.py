"""Path-based routing: the routes table maps a raw request path to a pool, its policy and the target.

The longest matching prefix wins; a prefix matches whole path segments (`/api` matches `/api`,
`/api/` and `/api/users`, not `/apis`; a prefix ending in `/` matches only below it). Matching is
done on the raw path as the client sent it (percent-encoding included), the same bytes the proxy
forwards. Requests matching no route go to the default pool (`LB_BACKENDS`, `LB_ALGORITHM`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from .balancers import Balancer, create_balancer
from .pool import Backend, Pool
from .ratelimit import KeyFunction, RateLimiter, Store, route_limit
from .settings import RouteSpec, Settings, SettingsError


class Cluster:
    """A pool and the policy balancing it, with the policy's optional hooks looked up once."""

    __slots__ = ("balancer", "limiter", "observe", "pool", "response_headers", "standby")

    def __init__(self, pool: Pool, balancer: Balancer) -> None:
        self.pool = pool
        self.balancer = balancer
        self.limiter: RateLimiter | None = None  # this route's rate limit (set by create_app)
        # None when the policy has no such hook: the proxy then skips the call (and its timing).
        self.observe = getattr(balancer, "observe", None)
        self.response_headers = getattr(balancer, "response_headers", None)
        self.standby = bool(getattr(balancer, "standby", False))

    def candidates(self) -> Sequence[Backend]:
        """The backends the policy may pick from (weight-0 standbys only for `first`)."""
        return self.pool.available if self.standby else self.pool.eligible


class Route:
    __slots__ = ("cluster", "prefix", "strip_prefix")

    def __init__(self, prefix: str, cluster: Cluster, strip_prefix: bool = False) -> None:
        self.prefix = prefix.encode("ascii")
        self.cluster = cluster
        self.strip_prefix = strip_prefix

    def matches(self, path: bytes) -> bool:
        prefix = self.prefix
        if not path.startswith(prefix):
            return False
        return len(path) == len(prefix) or prefix.endswith(b"/") or path[len(prefix)] == 0x2F  # "/"

    def target(self, path: bytes) -> bytes:
        """The path to forward: unchanged, or without the prefix (and never empty)."""
        if not self.strip_prefix:
            return path
        rest = path[len(self.prefix) :]
        return rest if rest.startswith(b"/") else b"/" + rest


class Router:
    """The routes table, longest prefix first."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = sorted(routes, key=lambda route: len(route.prefix), reverse=True)

    def route(self, path: bytes, default: Cluster) -> tuple[Cluster, bytes]:
        """The cluster for the raw `path` (without query) and the path to forward."""
        for route in self.routes:
            if route.matches(path):
                return route.cluster, route.target(path)
        return default, path


def route_settings(settings: Settings, spec: RouteSpec) -> Settings:
    """The settings a route's policy is built with: its own sticky cookie name.

    Every sticky cookie has `Path=/`, so each route gets its own name (suffixed by a hash of the
    prefix, stable across restarts) lest a route's cookie overwrite the default pool's.
    """
    suffix = hashlib.blake2b(spec.prefix.encode(), digest_size=3).hexdigest()
    return settings.model_copy(update={"sticky_cookie": f"{settings.sticky_cookie}-{suffix}"})


def build_router(settings: Settings) -> Router | None:
    """Pools and policies for `LB_ROUTES`; None when there is no routes table."""
    if not settings.routes:
        return None
    routes = []
    for index, spec in enumerate(settings.routes):
        name = spec.algorithm or settings.algorithm
        try:
            balancer = create_balancer(name, route_settings(settings, spec))
        except ValueError as exc:
            where = f"LB_ROUTES[{index}].algorithm" if spec.algorithm else "LB_ALGORITHM"
            raise SettingsError(f"invalid setting {where}: {exc}") from None
        pool = Pool.from_settings(spec.backends, settings)
        routes.append(Route(spec.prefix, Cluster(pool, balancer), spec.strip_prefix))
    return Router(routes)


def attach_limiters(settings: Settings, default: Cluster, router: Router | None, store: Store) -> list[str]:
    """Give every cluster with a rate limit its limiter; returns the limited routes' prefixes."""
    key = KeyFunction(settings.rate_limit_key, settings.rate_limit_ipv6_prefix)
    limited = []
    clusters: list[tuple[str, Cluster, RouteSpec | None, str]] = [("/", default, None, "LB_RATE_LIMIT")]
    if router is not None:
        specs = {spec.prefix: (index, spec) for index, spec in enumerate(settings.routes)}
        for route in router.routes:
            index, route_spec = specs[route.prefix.decode()]
            clusters.append((route_spec.prefix, route.cluster, route_spec, f"LB_ROUTES[{index}]"))
    for prefix, cluster, spec, where in clusters:
        limit = route_limit(settings, spec, where)
        if limit is not None:
            cluster.limiter = RateLimiter(prefix, limit, key, store)
            limited.append(prefix)
    return limited
