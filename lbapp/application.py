"""`create_app`: the composition root. Settings -> clusters -> proxy -> upstream, metrics observing.

It only wires: every part is built from the values it uses, and the lifespan owns everything with
a lifetime (the shared upstream client, one per process; the health loop; the metrics ticker),
cancelled and awaited on shutdown. Logging is the entry point's business (logs.configure_logging).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import Receive, Scope, Send

from .admin import AdminEndpoints, AdminGuard
from .cluster import Clusters, build_clusters
from .deadlines import Deadlines
from .discovery import Discovery
from .frontdoor import FrontDoor
from .headers import TrustedProxies
from .health import HealthChecker
from .layout import SharedLayout, digest, from_clusters
from .limitstores import create_store
from .metrics import Stats
from .multiproc import multiproc_dir
from .observe import AccessLog
from .proxy import Proxy
from .ratelimit import attach_limiters
from .reload import Reloader, listen_for_sighup, watch_config
from .retry import RetryBudget, RetryPolicy
from .runtime import Runtime
from .settings import BackendSpec, Settings, load_settings
from .shutdown import Drain
from .upstream import Upstream
from .views import Metrics
from .wsmetrics import WebSocketStats
from .wsproxy import WebSocketProxy
from .wsupstream import WebSocketConfig

logger = logging.getLogger("lbapp")


def sticky_secret(settings: Settings) -> bytes:
    """`LB_STICKY_SECRET`, or a random one for this process (said in the log when it matters)."""
    if settings.sticky_secret is not None:
        return settings.sticky_secret.get_secret_value().encode()
    uses_sticky = settings.algorithm == "sticky" or any(r.algorithm == "sticky" for r in settings.routes)
    if uses_sticky:
        logger.warning(
            "LB_STICKY_SECRET is not set: using a random one, so sticky sessions will not survive "
            "a restart and are not shared between workers"
        )
    return secrets.token_bytes(32)


class LoadBalancer(Starlette):
    """The Starlette app, with one shortcut: a proxied HTTP request goes straight to the proxy.

    Starlette would run it through two exception middlewares (each wrapping `send` once more) and
    a regex match per admin route before the catch-all; profiled, that was ~8% of a proxied
    request. Here one set lookup decides: a path of an admin or probe endpoint (or any request
    that is not plain HTTP) takes the usual way through `Starlette.__call__`. The contract is kept:
    `scope["app"]` is set, and an exception escaping the proxy reaches uvicorn, which logs it and
    answers 500 as `ServerErrorMiddleware` would (the proxy answers its own errors itself).
    """

    def __init__(self, *, own: list[Route], proxy: Proxy, websocket: WebSocketProxy, lifespan: Any) -> None:
        routes: list[BaseRoute] = [
            *own,  # the admin and probe endpoints
            Route(CATCH_ALL, proxy),
            # After the HTTP catch-all, so HTTP requests never test it; it matches WebSocket only.
            WebSocketRoute(CATCH_ALL, websocket),
        ]
        super().__init__(routes=routes, lifespan=lifespan)
        self.proxy = proxy
        # What the routes before the catch-all match: exact paths, and `{action}` paths by prefix.
        self.own_paths = frozenset(r.path for r in own if "{" not in r.path)
        self.own_prefixes = tuple(r.path.split("{")[0] for r in own if "{" in r.path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope.get("root_path"):
            path = scope["path"]
            if path not in self.own_paths and not path.startswith(self.own_prefixes):
                scope["app"] = self
                await self.proxy(scope, receive, send)  # type: ignore[arg-type]
                return
        await super().__call__(scope, receive, send)


CATCH_ALL = "/{path:path}"


def create_app(settings: Settings | None = None) -> Starlette:
    """Build the load balancer; `settings` defaults to the environment, settings.env and LB_CONFIG."""
    settings = settings or load_settings()
    secret = sticky_secret(settings)
    clusters = build_clusters(settings, secret)
    limit_store = attach_limiters(settings, clusters, lambda: create_store(settings, multiproc_dir()))
    stats = Stats()
    upstream = Upstream(
        transport=settings.transport,
        connect_timeout=settings.connect_timeout,
        timeout=settings.upstream_timeout,
        idle_timeout=settings.upstream_idle_timeout,
        max_connections=settings.upstream_max_connections,
    )
    proxy = Proxy(
        clusters,
        upstream,
        stats,
        retry=RetryPolicy(settings.max_retries, settings.retry_delay),
        budget=RetryBudget(settings.retry_budget, settings.retry_budget_min),
        trusted=TrustedProxies(settings.trusted_proxies),
        preserve_host=settings.preserve_host,
        access_log=AccessLog() if settings.access_log else None,
        front_door=FrontDoor(
            body_timeout=settings.client_body_timeout,
            request_buffer=settings.request_buffer,
            max_body=settings.max_body_size,
            max_in_flight=settings.max_in_flight,
            allow_trace=settings.allow_trace,
        ),
    )
    health = HealthChecker(
        [cluster.pool for cluster in clusters],
        kind=settings.health_type or "tcp",
        path=settings.health_path,
        method=settings.health_method,
        expected=settings.health_expected_status,
        body=settings.health_body,
        interval=settings.health_interval,
        unhealthy_interval=settings.health_unhealthy_interval,
        jitter=settings.health_jitter,
        timeout=settings.health_timeout,
    )
    ws_stats = WebSocketStats()
    stats.sources.append(ws_stats.families)
    websocket = WebSocketProxy(proxy, WebSocketConfig.from_settings(settings), ws_stats)
    directory = multiproc_dir()
    metrics = Metrics(stats, clusters, directory)
    runtime = Runtime(clusters, health, stats, settings.drain_timeout)
    guard = AdminGuard(settings.admin_allow, settings.admin_write_allow, settings.admin_token)
    drain = Drain(settings.shutdown_delay)
    admin = AdminEndpoints(clusters, metrics, upstream, guard, runtime, drain)
    reloader = Reloader(runtime, settings, secret)
    stats.sources.append(reloader.families)
    discovery = reloader.discovery = Discovery(runtime, settings.dns_interval)
    for cluster in clusters:
        discovery.set_specs(
            cluster.prefix, [(b.url, b.weight) for b in specs_of(settings, cluster.prefix) if b.discovery]
        )
    watched = settings.config.resolve() if settings.config_watch and settings.config else None
    shared = SharedLayout(directory, digest(settings), reloader.apply) if directory else None
    if shared is not None:  # several workers: a change made in one reaches the others
        reloader.shared = shared
        runtime.on_change = lambda: shared.publish(
            from_clusters(clusters, runtime.removing.__contains__, discovery)
        )
        runtime.on_sync = shared.poll

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
        stop_listening = listen_for_sighup(reloader)  # first: SIGHUP's default would end the process
        upstream.start()
        proxy.loop = asyncio.get_running_loop()
        proxy.deadlines = Deadlines(proxy.loop)
        tune_gc()
        drain.install()  # SIGTERM: /lb-ready fails first, uvicorn stops accepting after the delay
        if proxy.access_log is not None:
            proxy.access_log.start()  # the entry point has configured logging by now
        metrics.tick()  # the status page's first point; this worker's multiprocess files exist
        tasks = [
            asyncio.create_task(health.run(), name="lbapp-health"),
            asyncio.create_task(tick(), name="lbapp-metrics"),
            asyncio.create_task(discovery.run(), name="lbapp-discovery"),
        ]
        if shared is not None:
            others = metrics.store is not None and metrics.store.others_running
            shared.start(from_clusters(clusters, runtime.removing.__contains__, discovery), others)
            tasks.append(asyncio.create_task(shared.follow(), name="lbapp-layout"))
        stop_watching = asyncio.Event()
        if watched is not None:
            tasks.append(
                asyncio.create_task(watch_config(watched, reloader, stop_watching), name="lbapp-watch")
            )
        log_clusters(clusters)
        try:
            yield
        finally:
            drain.uninstall()
            stop_listening()
            stop_watching.set()
            for running in tasks:
                running.cancel()
            for running in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await running
            await runtime.aclose()
            await upstream.aclose()
            proxy.loop = proxy.deadlines = None
            if limit_store is not None:
                await limit_store.aclose()
            metrics.close()  # last flush; in-flight gauges of this worker stop counting

    own = admin.routes(settings.metrics_path, settings.json_metrics_path, settings.status_path)
    app = LoadBalancer(own=own, proxy=proxy, websocket=websocket, lifespan=lifespan)
    app.state.settings = settings
    app.state.clusters = clusters
    app.state.stats = stats
    app.state.websocket_stats = ws_stats
    app.state.metrics = metrics
    app.state.proxy = proxy
    app.state.health = health
    app.state.drain = drain
    app.state.runtime = runtime
    app.state.reloader = reloader
    app.state.discovery = discovery
    return app


# Objects allocated (net) between two young-generation collections; CPython's default is 700.
GC_YOUNG_THRESHOLD = 20_000


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap on the hot path.

    Profiled at full load, collections took ~9% of a worker's CPU: each request allocates a few
    hundred container objects (almost none in cycles), so CPython's default of a young collection
    every 700 allocations ran several times per request, and the older generations re-scanned
    every object made at start-up. Those are frozen (never scanned again), and the young threshold
    is raised: a young collection every ~20,000 allocations, which holds at most a few MB.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def specs_of(settings: Settings, prefix: str) -> list[BackendSpec]:
    if prefix == "/":
        return list(settings.backends)
    return next((list(r.backends) for r in settings.routes if r.prefix == prefix), [])


def log_clusters(clusters: Clusters) -> None:
    for cluster in clusters:
        logger.info(
            "route %s: balancing %d backends (%s): %s",
            cluster.prefix,
            len(cluster.pool.backends),
            type(cluster.balancer).__name__,
            ", ".join(b.url for b in cluster.pool.backends),
        )
