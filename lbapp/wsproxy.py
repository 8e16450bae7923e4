"""The WebSocket catch-all: choose a backend as for HTTP, open its WebSocket, accept, relay.

The same rules as the HTTP proxy (proxy.py), applied once per session instead of per request:
`Proxy.prepare` filters the headers and picks the route's cluster and target; the cluster's policy
picks the backend (sticky and hash policies see the same `RequestInfo`, so affinity holds), its
pool admits it (drained, ejected and down backends get no new sessions, a backend at
`LB_BACKEND_MAX_CONNS` queues or refuses them) and holds a lease for the whole session, so
in-flight counts and least-connections see open sessions. A drained backend keeps the sessions
it has until they end. A backend that cannot be reached is tried on the next one (nothing was
sent); once it answered the handshake, its answer is the client's answer.

The handshake counts as an HTTP request in the request metrics (a `GET`, answered `101`, a
refusal's status or lbapp's own 502/503/504); the session counts in the `lb_websocket_*`
families and in one access-log line when it closes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx
from websockets.exceptions import InvalidStatus

from .admission import Full
from .answers import AT_CAPACITY, BAD_GATEWAY, OVERLOADED, UPSTREAM_ERRORS, Answer, http_date
from .backend import Backend
from .metrics import Stats
from .observe import AccessLog
from .pool import Pool
from .proxy import Prepared, Proxy
from .requestid import HEADER, ensure_request_id
from .websocket import Session
from .wsmetrics import WebSocketStats
from .wsupstream import (
    Unreachable,
    WebSocketConfig,
    accept_message,
    deny,
    forward_headers,
    open_upstream,
    refusal,
)

logger = logging.getLogger("lbapp.websocket")

Scope = dict[str, Any]
Receive = Any
Send = Any


class Handshake:
    """The opening handshake: what `Stats.end` reads of an exchange (as of observe.Tap), and the
    session it opened (with the pool holding its backend's lease), if it did."""

    __slots__ = ("attempts", "backend", "bytes_in", "bytes_out", "headers_at", "pool", "session", "status")

    def __init__(self) -> None:
        self.bytes_in = self.bytes_out = 0
        self.headers_at = 0.0  # when the 101 or the refusal went out
        self.status = 0
        self.attempts = 0
        self.backend: Backend | None = None
        self.pool: Pool | None = None
        self.session: Session | None = None


class WebSocketProxy:
    """The ASGI endpoint behind the WebSocket catch-all route."""

    def __init__(
        self,
        proxy: Proxy,
        config: WebSocketConfig,
        stats: WebSocketStats,
        access_log: AccessLog | None = None,
    ) -> None:
        self.proxy = proxy  # its `prepare`, clusters, retry rules and request counters are shared
        self.config = config
        self.stats = stats
        self.access_log = access_log if access_log is not None else proxy.access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        if (await receive())["type"] != "websocket.connect":
            return
        scope = {**scope, "method": "GET"}  # prepare() and the policies read it as a request
        request_id = ensure_request_id(scope)  # before prepare(): the backend gets it too
        http_stats: Stats = self.proxy.stats
        http_stats.begin()
        handshake = Handshake()
        try:
            await self._open(scope, receive, send, handshake, request_id)
        finally:
            if not handshake.headers_at:
                handshake.headers_at = time.perf_counter()
            http_stats.end(handshake.backend, "GET", handshake.status, handshake, started)
        session, backend, pool = handshake.session, handshake.backend, handshake.pool
        try:
            if session is not None and backend is not None and pool is not None:
                self.stats.opened(backend, session)
                try:
                    await session.run()
                finally:
                    pool.release(backend)
                    self.stats.closed(session, time.perf_counter() - handshake.headers_at)
                    if session.ended_by == "backend" and session.close_code == 1006:
                        http_stats.upstream_error(backend, httpx.ReadError("connection lost"))
                        pool.record_failure(backend, "WebSocket connection lost")
        finally:
            if self.access_log is not None:
                self.access_log.write_websocket(
                    scope,
                    request_id,
                    handshake.status,
                    handshake.backend,
                    handshake.attempts,
                    started,
                    handshake.headers_at,
                    session,
                )

    async def _open(
        self, scope: Scope, receive: Receive, send: Send, handshake: Handshake, request_id: bytes
    ) -> None:
        """Pick a backend and open its WebSocket; accept the client, or answer with an HTTP status."""
        proxy = self.proxy
        limit = proxy.front_door.max_in_flight
        prepared = proxy.prepare(scope) if not limit or proxy.stats.in_flight <= limit else OVERLOADED
        if not isinstance(prepared, Prepared):  # refused before any backend was chosen
            await self._error(scope, send, handshake, prepared, request_id)
            return
        cluster, pool, head = prepared.cluster, prepared.cluster.pool, prepared.head
        headers = forward_headers(head.headers)
        subprotocols = list(scope.get("subprotocols") or ())
        tried: set[Backend] = set()
        last_status = 503
        while True:
            choice = await cluster.admit(prepared.info, tried)
            if isinstance(choice, Full):
                await self._error(scope, send, handshake, AT_CAPACITY, request_id)
                return
            if choice is None:
                await self._error(scope, send, handshake, UPSTREAM_ERRORS[last_status], request_id)
                return
            backend = handshake.backend = choice
            handshake.attempts += 1
            target = (backend.base_path + prepared.target).decode("latin-1")
            sent = headers
            if not proxy.preserve_host or not head.host:
                sent = [(n, v) for n, v in headers if n != "host"]
                sent.append(("host", backend.host_header.decode("latin-1")))
            pool.lease(backend)
            sent_at = time.perf_counter()
            try:
                upstream = await open_upstream(backend.url, target, sent, subprotocols, self.config)
            except Unreachable as exc:  # nothing was sent: the next backend may take it
                pool.release(backend)
                tried.add(backend)
                proxy.stats.upstream_error(backend, httpx.ConnectError(str(exc)))
                cluster.failed(backend, str(exc), time.perf_counter() - sent_at)
                logger.warning("WebSocket to backend %s failed: %s", backend.url, exc)
                last_status = 502
                if handshake.attempts > proxy.retry.max_retries:
                    await self._error(scope, send, handshake, BAD_GATEWAY, request_id)
                    return
                continue
            except InvalidStatus as exc:  # the backend's answer is the client's answer
                pool.release(backend)
                status, forwarded, body = refusal(exc.response)
                cluster.answered(backend, status, time.perf_counter() - sent_at)
                await deny(scope, send, status, [*forwarded, (HEADER, request_id)], body)
                handshake.status, handshake.headers_at = status, time.perf_counter()
                return
            except Exception as exc:  # no answer in time (504), or a broken one (502)
                pool.release(backend)
                # Counted in lb_upstream_errors by the kinds of the HTTP path (httpx's error types).
                timeout = isinstance(exc, TimeoutError)
                kind = httpx.ReadTimeout if timeout else httpx.RemoteProtocolError
                proxy.stats.upstream_error(backend, kind(str(exc)))
                cluster.failed(backend, type(exc).__name__, time.perf_counter() - sent_at)
                logger.warning(
                    "WebSocket handshake with %s failed: %s: %s", backend.url, type(exc).__name__, exc
                )
                status = 504 if timeout else 502
                await self._error(scope, send, handshake, UPSTREAM_ERRORS[status], request_id)
                return
            except BaseException:
                pool.release(backend)
                raise
            break
        cluster.answered(backend, 101, time.perf_counter() - sent_at)
        extra = [(HEADER, request_id)]
        if cluster.response_headers is not None:  # e.g. sticky's Set-Cookie
            extra += cluster.response_headers(backend, prepared.info) or []
        try:
            await send(accept_message(upstream, extra))
        except BaseException as exc:
            pool.release(backend)
            upstream.transport.abort()
            if isinstance(exc, OSError):  # the client left during the handshake (uvicorn's error)
                handshake.status = 499
                return
            raise
        handshake.status, handshake.headers_at = 101, time.perf_counter()
        handshake.pool = pool
        handshake.session = Session(upstream, receive, send, self.config)

    async def _error(
        self, scope: Scope, send: Send, handshake: Handshake, answer: Answer, request_id: bytes
    ) -> None:
        """One of lbapp's own answers (answers.py) as the handshake's denial response, counted."""
        start, body = answer
        status: int = start["status"]
        self.proxy.stats.observe_error(status)
        headers = [*start["headers"], (b"date", http_date()), (HEADER, request_id)]
        await deny(scope, send, status, headers, body["body"])
        handshake.status, handshake.headers_at = status, time.perf_counter()
