"""`create_app`: settings -> pool -> balancer -> proxy, wired into a Starlette app with a lifespan.

The lifespan owns everything with a lifetime: the shared upstream client (one per process, never
per request) and the health-check task, which is cancelled and awaited on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .balancers import create_balancer
from .health import HealthChecker
from .logs import configure_logging
from .metrics import Stats, create_registry, lb_metrics, render
from .pool import Pool
from .proxy import Proxy
from .routing import build_router
from .settings import Settings, SettingsError, load_settings

logger = logging.getLogger("lbapp")


def no_cookies() -> CookieJar:
    """A jar that stores nothing: a shared client must never replay one client's cookies to another."""
    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


def create_client(settings: Settings) -> httpx.AsyncClient:
    timeout = httpx.Timeout(
        connect=settings.connect_timeout,
        read=settings.upstream_timeout,
        write=settings.upstream_timeout,
        pool=settings.upstream_timeout,
    )
    max_connections = settings.upstream_max_connections or None
    transport = httpx.AsyncHTTPTransport(
        limits=httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections or 256,
            keepalive_expiry=settings.upstream_idle_timeout,
        ),
        trust_env=False,
    )
    client = httpx.AsyncClient(
        transport=transport,
        timeout=timeout,
        follow_redirects=False,
        trust_env=False,
        cookies=no_cookies(),
    )
    client.headers.clear()  # httpx's default Accept/User-Agent/... must not be invented
    return client


def create_app(settings: Settings | None = None) -> Starlette:
    """Build the load balancer; `settings` defaults to the environment, settings.env and LB_CONFIG."""
    settings = settings or load_settings()
    configure_logging(settings)
    try:
        balancer = create_balancer(settings.algorithm, settings)
    except ValueError as exc:
        raise SettingsError(f"invalid setting LB_ALGORITHM: {exc}") from None
    router = build_router(settings)
    pool = Pool(settings.backends, settings.healthy_threshold, settings.unhealthy_threshold)
    stats = Stats()
    proxy = Proxy(settings, pool, balancer, stats, router)
    health = HealthChecker(pool, settings)
    # Each route's pool is checked by a loop of its own, like the default pool.
    route_health = [HealthChecker(r.upstream.pool, settings) for r in router.routes] if router else []
    registry = create_registry(stats, pool)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        proxy.client = create_client(settings)
        tasks = [asyncio.create_task(health.run(), name="lbapp-health")]
        tasks += [asyncio.create_task(h.run(), name="lbapp-health-route") for h in route_health]
        logger.info(
            "lbapp balancing %d backends (%s): %s",
            len(pool.backends),
            settings.algorithm,
            ", ".join(b.url for b in pool.backends),
        )
        for route in router.routes if router else ():
            logger.info(
                "route %s: %d backends (%s)",
                route.prefix.decode(),
                len(route.upstream.pool.backends),
                type(route.upstream.balancer).__name__,
            )
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await proxy.client.aclose()

    async def metrics(request: Request) -> Response:
        return Response(render(registry), media_type=CONTENT_TYPE_LATEST)

    async def metrics_json(request: Request) -> Response:
        return Response(json.dumps(lb_metrics(stats, pool)), media_type="application/json")

    async def live(request: Request) -> Response:
        return Response(b'{"status": "ok"}', media_type="application/json")

    async def ready(request: Request) -> Response:
        ok = proxy.client is not None and bool(pool.eligible)
        body = json.dumps({"ready": ok, "healthy_backends": len(pool.eligible)})
        return Response(body, status_code=200 if ok else 503, media_type="application/json")

    routes = [
        Route("/metrics", metrics, methods=["GET"]),
        Route("/lb-metrics", metrics_json, methods=["GET"]),
        Route("/lb-health", live, methods=["GET"]),
        Route("/lb-ready", ready, methods=["GET"]),
        Route("/{path:path}", proxy),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.settings = settings
    app.state.pool = pool
    app.state.stats = stats
    app.state.proxy = proxy
    app.state.health = health
    app.state.router = router
    return app
