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
from .headers import Networks
from .health import HealthChecker
from .logs import configure_logging
from .metrics import Stats
from .multiproc import multiproc_dir
from .pool import Pool
from .proxy import Proxy
from .ratelimit import create_store
from .routing import attach_limiters, build_router
from .settings import Settings, SettingsError, load_settings
from .status import STATUS_PAGE
from .views import Metrics

logger = logging.getLogger("lbapp")


def forbidden() -> Response:
    return Response(b'{"error": "forbidden"}', status_code=403, media_type="application/json")


NO_STORE = {"cache-control": "no-store"}
ADMIN_ACTIONS = ("drain", "undrain", "eject", "uneject")


def json_response(document: dict[str, object], status: int = 200) -> Response:
    return Response(json.dumps(document), status_code=status, media_type="application/json")


class AdminGuard:
    """`LB_ADMIN_ALLOW`: the networks allowed to read the admin endpoints (empty: everyone).

    Matched against the TCP peer, never against `X-Forwarded-For`, which anyone can send.
    """

    def __init__(self, networks: list[str]) -> None:
        self.networks = Networks(networks)

    def allows(self, request: Request) -> bool:
        if not self.networks:
            return True
        return request.client is not None and self.networks.contains(request.client.host)


def create_app(settings: Settings | None = None) -> Starlette:
    """Build the load balancer; `settings` defaults to the environment, settings.env and LB_CONFIG."""
    settings = settings or load_settings()
    configure_logging(settings)
    try:
        balancer = create_balancer(settings.algorithm, settings)
    except ValueError as exc:
        raise SettingsError(f"invalid setting LB_ALGORITHM: {exc}") from None
    router = build_router(settings)
    pool = Pool.from_settings(settings.backends, settings)
    stats = Stats()
    proxy = Proxy(settings, pool, balancer, stats, router)
    limit_store = (
        create_store(settings, multiproc_dir())
        if settings.rate_limit or any(r.rate_limit for r in settings.routes)
        else None
    )
    if limit_store is not None:
        stats.limited_routes(attach_limiters(settings, proxy.cluster, router, limit_store))
    health = HealthChecker(pool, settings)
    metrics = Metrics(stats, pool, multiproc_dir())
    guard = AdminGuard(settings.admin_allow)
    write_guard = AdminGuard(settings.admin_write_allow)
    pools = [pool, *(r.cluster.pool for r in router.routes)] if router else [pool]
    # Each route's pool is checked by a loop of its own, like the default pool.
    route_health = [HealthChecker(r.cluster.pool, settings) for r in router.routes] if router else []

    async def tick() -> None:
        """Flush to the multiprocess files and keep the status page's history, off the hot path."""
        while True:
            await asyncio.sleep(settings.metrics_flush_interval)
            try:
                metrics.tick()
            except Exception:
                logger.exception("metrics tick failed; next in %.1fs", settings.metrics_flush_interval)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        proxy.upstream.start()
        tasks = [asyncio.create_task(health.run(), name="lbapp-health")]
        tasks += [asyncio.create_task(h.run(), name="lbapp-health-route") for h in route_health]
        metrics.tick()  # the status page's first point; this worker's multiprocess files exist
        tasks.append(asyncio.create_task(tick(), name="lbapp-metrics"))
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
                len(route.cluster.pool.backends),
                type(route.cluster.balancer).__name__,
            )
        try:
            yield
        finally:
            for running in tasks:
                running.cancel()
            for running in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await running
            await proxy.upstream.aclose()
            if limit_store is not None:
                await limit_store.aclose()
            metrics.close()  # last flush; in-flight gauges of this worker stop counting

    async def prometheus(request: Request) -> Response:
        if not guard.allows(request):
            return forbidden()
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def metrics_json(request: Request) -> Response:
        if not guard.allows(request):
            return forbidden()
        return Response(json.dumps(metrics.lb_metrics()), media_type="application/json")

    async def status(request: Request) -> Response:
        if not guard.allows(request):
            return forbidden()
        if request.query_params.get("format") == "json":
            return Response(json.dumps(metrics.status()), media_type="application/json", headers=NO_STORE)
        return Response(STATUS_PAGE, media_type="text/html; charset=utf-8", headers=NO_STORE)

    async def backend_action(request: Request) -> Response:
        """POST /lb-admin/backends/{drain,undrain,eject,uneject}?url=...: every pool holding it."""
        if not write_guard.allows(request):
            return forbidden()
        action = request.path_params["action"]
        if action not in ADMIN_ACTIONS:
            return json_response(
                {"error": f"unknown action, expected one of {', '.join(ADMIN_ACTIONS)}"}, 404
            )
        url = request.query_params.get("url", "")
        found = [(p, b) for p in pools if (b := p.find(url)) is not None]
        if not found:
            return json_response({"error": "no such backend", "url": url}, 404)
        for owner, backend in found:
            if action == "drain":
                owner.drain(backend)
            elif action == "undrain":
                owner.undrain(backend)
            elif action == "uneject":
                owner.uneject(backend, "returned through the admin API")
            elif not backend.ejected_until and not owner.eject(backend, "ejected through the admin API"):
                return json_response(
                    {"error": "LB_OUTLIER_MAX_EJECTION_PERCENT reached", "url": backend.url}, 409
                )
        backend = found[0][1]
        return json_response({"url": backend.url, "state": backend.state, "in_flight": backend.in_flight})

    async def live(request: Request) -> Response:
        return Response(b'{"status": "ok"}', media_type="application/json")

    async def ready(request: Request) -> Response:
        # Envoy's /ready: started and serving, whatever the backends' health (an LB with every
        # backend down still answers 503 and serves /metrics; restarting it would fix nothing).
        client = proxy.upstream.client
        ok = client is not None and not client.is_closed
        body = json.dumps({"ready": ok, "healthy_backends": len(pool.eligible)})
        return Response(body, status_code=200 if ok else 503, media_type="application/json")

    admin = (
        (settings.metrics_path, prometheus),
        (settings.json_metrics_path, metrics_json),
        (settings.status_path, status),
    )
    routes = [
        *(Route(path, endpoint, methods=["GET"]) for path, endpoint in admin if path),
        Route("/lb-health", live, methods=["GET"]),
        Route("/lb-admin/backends/{action}", backend_action, methods=["POST"]),
        Route("/lb-ready", ready, methods=["GET"]),
        Route("/{path:path}", proxy),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.settings = settings
    app.state.pool = pool
    app.state.stats = stats
    app.state.metrics = metrics
    app.state.proxy = proxy
    app.state.health = health
    app.state.router = router
    return app
