"""lbapp's own endpoints: probes, metrics views, the status page and the admin API.

Every endpoint reads the app's state (`AppState`); one `AdminGuard` decides who may read the
views and who may change a backend. Matching is on the TCP peer, never on `X-Forwarded-For`,
which anyone can send.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, request_response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .answers import http_date
from .backend import Backend
from .cluster import Clusters
from .headers import Networks
from .pool import Pool
from .status import STATUS_PAGE
from .upstream import Upstream
from .views import Metrics

NO_STORE = {"cache-control": "no-store"}


def json_response(
    document: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(json.dumps(document), status_code=status, media_type="application/json", headers=headers)


FORBIDDEN = json_response({"error": "forbidden"}, 403)


class AdminGuard:
    """`LB_ADMIN_ALLOW` may read the views, `LB_ADMIN_WRITE_ALLOW` may act (empty: everyone)."""

    def __init__(self, read: list[str], write: list[str]) -> None:
        self.read = Networks(read)
        self.write = Networks(write)

    @staticmethod
    def _allows(networks: Networks, request: Request) -> bool:
        if not networks:
            return True
        return request.client is not None and networks.contains(request.client.host)

    def may_read(self, request: Request) -> bool:
        return self._allows(self.read, request)

    def may_write(self, request: Request) -> bool:
        return self._allows(self.write, request)


def _eject(pool: Pool, backend: Backend) -> str | None:
    if backend.ejected_until or pool.eject(backend, "ejected through the admin API"):
        return None
    return "LB_OUTLIER_MAX_EJECTION_PERCENT reached"


# An action on one backend of one pool: None, or why it could not be done (409).
ACTIONS: dict[str, Callable[[Pool, Backend], str | None]] = {
    "drain": lambda pool, backend: pool.drain(backend),
    "undrain": lambda pool, backend: pool.undrain(backend),
    "eject": _eject,
    "uneject": lambda pool, backend: pool.uneject(backend, "returned through the admin API"),
}


class Dated:
    """An endpoint whose answers carry a `Date` (RFC 9110 §6.6.1), as every lbapp answer does."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_dated(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (b"date", http_date())]
            await send(message)

        await self.app(scope, receive, send_dated)


def route(path: str, endpoint: Callable[[Request], Awaitable[Response]], method: str) -> Route:
    return Route(path, Dated(request_response(endpoint)), methods=[method])


class AdminEndpoints:
    """The endpoints, bound to the app's clusters, metrics and upstream client."""

    def __init__(self, clusters: Clusters, metrics: Metrics, upstream: Upstream, guard: AdminGuard) -> None:
        self.clusters = clusters
        self.metrics = metrics
        self.upstream = upstream
        self.guard = guard

    def routes(self, metrics_path: str, json_path: str, status_path: str) -> list[BaseRoute]:
        """Starlette routes for every endpoint whose path is set (an empty path turns one off)."""
        views = ((metrics_path, self.prometheus), (json_path, self.lb_metrics), (status_path, self.status))
        return [
            *(route(path, endpoint, "GET") for path, endpoint in views if path),
            route("/lb-health", self.live, "GET"),
            route("/lb-ready", self.ready, "GET"),
            route("/lb-admin/backends/{action}", self.backend_action, "POST"),
        ]

    async def prometheus(self, request: Request) -> Response:
        if not self.guard.may_read(request):
            return FORBIDDEN
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def lb_metrics(self, request: Request) -> Response:
        if not self.guard.may_read(request):
            return FORBIDDEN
        return json_response(self.metrics.lb_metrics())

    async def status(self, request: Request) -> Response:
        if not self.guard.may_read(request):
            return FORBIDDEN
        if request.query_params.get("format") == "json":
            return json_response(self.metrics.status(), headers=NO_STORE)
        return Response(STATUS_PAGE, media_type="text/html; charset=utf-8", headers=NO_STORE)

    async def backend_action(self, request: Request) -> Response:
        """POST /lb-admin/backends/{drain,undrain,eject,uneject}?url=...: in every pool holding it."""
        if not self.guard.may_write(request):
            return FORBIDDEN
        action = ACTIONS.get(request.path_params["action"])
        if action is None:
            return json_response({"error": f"unknown action, expected one of {', '.join(ACTIONS)}"}, 404)
        url = request.query_params.get("url", "")
        found = self.clusters.find(url)
        if not found:
            return json_response({"error": "no such backend", "url": url}, 404)
        for pool, backend in found:
            refused = action(pool, backend)
            if refused:
                return json_response({"error": refused, "url": backend.url}, 409)
        backend = found[0][1]
        return json_response({"url": backend.url, "state": backend.state, "in_flight": backend.in_flight})

    async def live(self, request: Request) -> Response:
        return json_response({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        # Envoy's /ready: started and serving, whatever the backends' health (an LB with every
        # backend down still answers 503 and serves /metrics; restarting it would fix nothing).
        ok = self.upstream.started
        healthy = sum(len(cluster.pool.eligible) for cluster in self.clusters)
        return json_response({"ready": ok, "healthy_backends": healthy}, 200 if ok else 503)
