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
from .settings import Settings, SettingsError, load_settings

logger = logging.getLogger("lbapp")


def create_app(settings: Settings | None = None) -> Starlette:
    """Build the load balancer; `settings` defaults to the environment, settings.env and LB_CONFIG."""
    settings = settings or load_settings()
    configure_logging(settings)
    try:
        balancer = create_balancer(settings.algorithm)
    except ValueError as exc:
        raise SettingsError(f"invalid setting LB_ALGORITHM: {exc}") from None
    pool = Pool(settings.backends, settings.healthy_threshold, settings.unhealthy_threshold)
    stats = Stats()
    proxy = Proxy(settings, pool, balancer, stats)
    health = HealthChecker(pool, settings)
    registry = create_registry(stats, pool)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        proxy.upstream.start()
        task = asyncio.create_task(health.run(), name="lbapp-health")
        logger.info(
            "lbapp balancing %d backends (%s): %s",
            len(pool.backends),
            settings.algorithm,
            ", ".join(b.url for b in pool.backends),
        )
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await proxy.upstream.aclose()

    async def metrics(request: Request) -> Response:
        return Response(render(registry), media_type=CONTENT_TYPE_LATEST)

    async def metrics_json(request: Request) -> Response:
        return Response(json.dumps(lb_metrics(stats, pool)), media_type="application/json")

    async def live(request: Request) -> Response:
        return Response(b'{"status": "ok"}', media_type="application/json")

    async def ready(request: Request) -> Response:
        ok = proxy.upstream.client is not None and bool(pool.eligible)
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
    return app
