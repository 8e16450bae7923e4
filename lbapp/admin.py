"""lbapp's own endpoints: probes, metrics views, the status page and the admin API.

Every endpoint reads the app's state (`AppState`); one `AdminGuard` decides who may read the
views and who may change a backend. Matching is on the TCP peer, never on `X-Forwarded-For`,
which anyone can send.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import SecretStr
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, request_response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .answers import http_date
from .backend import Backend
from .cluster import Clusters
from .headers import Networks
from .pool import Pool
from .runtime import ChangeError, Runtime, check_weight, describe
from .shutdown import Drain
from .status import STATUS_PAGE
from .upstream import Upstream
from .views import Metrics

NO_STORE = {"cache-control": "no-store"}


def json_response(
    document: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(json.dumps(document), status_code=status, media_type="application/json", headers=headers)


FORBIDDEN = json_response({"error": "forbidden"}, 403)
CROSS_ORIGIN = json_response({"error": "cross-origin admin writes are refused"}, 403)
NOT_JSON = json_response({"error": "a request body must be application/json"}, 415)
REALM = 'Bearer realm="lbapp-admin"'
NO_TOKEN = json_response({"error": "a bearer token is required"}, 401, {"www-authenticate": REALM})
BAD_TOKEN = json_response(
    {"error": "invalid token"}, 401, {"www-authenticate": REALM + ', error="invalid_token"'}
)
# Go's CrossOriginProtection also refuses `same-site`: a sibling subdomain is another origin.
CROSS_SITE = frozenset({"cross-site", "same-site"})


class AdminGuard:
    """Who may read the views and who may change a backend.

    Reads: the TCP peer is in `LB_ADMIN_ALLOW`. Writes, in this order: the peer is in
    `LB_ADMIN_WRITE_ALLOW` (403); the request does not come from a browser page (no `Origin`,
    `Sec-Fetch-Site` not cross-site or same-site: 403); with `LB_ADMIN_TOKEN`, it carries
    `Authorization: Bearer <token>` (401, RFC 6750); a body is `application/json` (415).
    An empty allow-list lets everyone through that check.
    """

    def __init__(self, read: list[str], write: list[str], token: SecretStr | None = None) -> None:
        self.read = Networks(read)
        self.write = Networks(write)
        self._token = token.get_secret_value().encode() if token is not None else None

    @staticmethod
    def _allows(networks: Networks, request: Request) -> bool:
        if not networks:
            return True
        return request.client is not None and networks.contains(request.client.host)

    def may_read(self, request: Request) -> bool:
        return self._allows(self.read, request)

    def may_write(self, request: Request) -> bool:
        return self._allows(self.write, request)

    def refuse_write(self, request: Request) -> Response | None:
        """None when `request` may change state, else the answer refusing it."""
        if not self.may_write(request):
            return FORBIDDEN
        headers = request.headers
        if "origin" in headers or headers.get("sec-fetch-site", "").strip().lower() in CROSS_SITE:
            return CROSS_ORIGIN
        if self._token is not None:
            scheme, _, credentials = headers.get("authorization", "").strip().partition(" ")
            if not scheme:
                return NO_TOKEN
            given = credentials.strip().encode("latin-1")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given, self._token):
                return BAD_TOKEN
        has_body = headers.get("content-length", "0").strip() != "0" or "transfer-encoding" in headers
        media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
        if has_body and media_type != "application/json":
            return NOT_JSON
        return None


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


def route(path: str, endpoint: Callable[[Request], Awaitable[Response]], *methods: str) -> Route:
    return Route(path, Dated(request_response(endpoint)), methods=list(methods))


MAX_BODY = 64 * 1024  # an admin request body is a small JSON object


async def read_object(request: Request) -> dict[str, Any]:
    """The request's JSON object body (the guard has checked its media type), bounded in size."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise ChangeError(413, f"the body is larger than {MAX_BODY} bytes")
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ChangeError(400, "the body is not valid JSON") from None
    if not isinstance(document, dict):
        raise ChangeError(400, "the body must be a JSON object")
    return document


def refusal(error: ChangeError) -> Response:
    return json_response({"error": error.message}, error.status)


class AdminEndpoints:
    """The endpoints, bound to the app's clusters, metrics, upstream client and runtime changes."""

    def __init__(
        self,
        clusters: Clusters,
        metrics: Metrics,
        upstream: Upstream,
        guard: AdminGuard,
        runtime: Runtime,
        drain: Drain | None = None,
    ) -> None:
        self.clusters = clusters
        self.metrics = metrics
        self.upstream = upstream
        self.guard = guard
        self.runtime = runtime
        self.drain = drain or Drain()

    def routes(self, metrics_path: str, json_path: str, status_path: str) -> list[Route]:
        """Starlette routes for every endpoint whose path is set (an empty path turns one off)."""
        views = ((metrics_path, self.prometheus), (json_path, self.lb_metrics), (status_path, self.status))
        return [
            *(route(path, endpoint, "GET") for path, endpoint in views if path),
            route("/lb-health", self.live, "GET"),
            route("/lb-ready", self.ready, "GET"),
            route("/lb-admin/backends/{action}", self.backend_action, "POST"),
            route("/lb-admin/backends", self.backends, "GET", "POST", "DELETE", "PATCH"),
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
            document = self.metrics.status()
            # This worker's own counts (not summed over workers): what a soak watches for leaks.
            document["process"] = {"pid": os.getpid(), "asyncio_tasks": len(asyncio.all_tasks())}
            return json_response(document, headers=NO_STORE)
        return Response(STATUS_PAGE, media_type="text/html; charset=utf-8", headers=NO_STORE)

    async def backend_action(self, request: Request) -> Response:
        """POST /lb-admin/backends/{drain,undrain,eject,uneject}?url=...: in every pool holding it."""
        refused = self.guard.refuse_write(request)
        if refused is not None:
            return refused
        action = ACTIONS.get(request.path_params["action"])
        if action is None:
            return json_response({"error": f"unknown action, expected one of {', '.join(ACTIONS)}"}, 404)
        url = request.query_params.get("url", "")
        self.runtime.sync()
        found = self.clusters.find(url)
        if not found:
            return json_response({"error": "no such backend", "url": url}, 404)
        leaving = [b for _, b in found if b in self.runtime.removing]
        if leaving and request.path_params["action"] == "undrain":
            error = "being removed (DELETE); POST it to /lb-admin/backends to keep it"
            return json_response({"error": error, "url": leaving[0].url}, 409)
        for pool, backend in found:
            failed = action(pool, backend)
            if failed:
                return json_response({"error": failed, "url": backend.url}, 409)
        self.runtime.changed()
        backend = found[0][1]
        return json_response({"url": backend.url, "state": backend.state, "in_flight": backend.in_flight})

    async def backends(self, request: Request) -> Response:
        """GET lists; POST adds; DELETE ?url= drains then removes; PATCH ?url= re-weights."""
        if request.method == "GET":
            if not self.guard.may_read(request):
                return FORBIDDEN
            document = {"backends": self.runtime.backends(), "worker": os.getpid()}
            return json_response(document, headers=NO_STORE)
        refused = self.guard.refuse_write(request)
        if refused is not None:
            return refused
        runtime, query = self.runtime, request.query_params
        try:
            body = await read_object(request) if request.method != "DELETE" else {}
            runtime.sync()  # no await from here to the change's publication: nothing is lost
            if request.method == "POST":
                unknown = sorted(set(body) - {"url", "weight", "route"})
                if unknown:
                    raise ChangeError(400, f"unknown field {unknown[0]!r} (expected url, weight, route)")
                cluster, backend = runtime.add(body.get("url"), body.get("weight", 1), body.get("route"))
                runtime.changed()
                return json_response(describe(cluster, backend), 201)
            found = runtime.found(query.get("url"), query.get("route"))
            if request.method == "DELETE":
                for cluster, backend in found:
                    runtime.remove(cluster, backend)
                runtime.changed()
                return json_response({"backends": [describe(c, b) for c, b in found]}, 202)
            if set(body) != {"weight"}:
                raise ChangeError(400, 'expected {"weight": N}')
            weight = check_weight(body["weight"])
            for cluster, backend in found:
                runtime.set_weight(cluster, backend, weight)
            runtime.changed()
            return json_response({"backends": [describe(c, b) for c, b in found]})
        except ChangeError as error:
            return refusal(error)

    async def live(self, request: Request) -> Response:
        return json_response({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        # Envoy's /ready: started and serving, whatever the backends' health (an LB with every
        # backend down still answers 503 and serves /metrics; restarting it would fix nothing).
        # Draining (shutdown.py): not ready from the first SIGTERM on, while still serving.
        ok = self.upstream.started and not self.drain.draining
        healthy = sum(len(cluster.pool.eligible) for cluster in self.clusters)
        return json_response({"ready": ok, "healthy_backends": healthy}, 200 if ok else 503)
