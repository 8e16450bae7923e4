"""The catch-all route: pick a backend, stream the request to it, stream its answer back.

Raw ASGI rather than `StreamingResponse`: it costs one task per request (the disconnect
watcher) instead of a task group, and lets a broken upstream body abort the client connection
instead of ending it cleanly. Retries follow one rule: a request is sent again only if nothing
of it reached a backend, or it is idempotent and has no body (see `Attempt.retryable`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx

from .balancers import Balancer, RequestInfo
from .headers import (
    NO_BODY_STATUS,
    TrustedProxies,
    add_forwarding_headers,
    filter_response_headers,
    parse_request_headers,
)
from .metrics import Stats
from .observe import Tap, access_log
from .pool import Backend, Pool
from .routing import Cluster, Router
from .settings import Settings
from .upstream import Upstream, lower_headers

logger = logging.getLogger("lbapp.proxy")
access_logger = logging.getLogger("lbapp.access")  # written by observe.access_log

Scope = dict[str, Any]
Receive = Any
Send = Any

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
CONNECT_PHASE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
EMPTY_BODY = httpx.ByteStream(b"")


class ClientDisconnected(Exception):
    """The client went away while we were still reading its body."""


def json_error(status: int, message: str) -> tuple[dict[str, Any], dict[str, Any]]:
    body = b'{"error": "%s"}' % message.encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 503:
        headers.append((b"retry-after", b"1"))
    return (
        {"type": "http.response.start", "status": status, "headers": headers},
        {"type": "http.response.body", "body": body, "more_body": False},
    )


ERRORS = {
    502: json_error(502, "bad gateway"),
    503: json_error(503, "all backends are down"),
    504: json_error(504, "gateway timeout"),
}


class ClientBody(httpx.AsyncByteStream):
    """The client's request body, read from ASGI `receive` as the upstream asks for it."""

    __slots__ = ("exchange", "receive", "started")

    def __init__(self, receive: Receive, exchange: Exchange) -> None:
        self.receive = receive
        self.exchange = exchange
        self.started = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.started:
            raise httpx.StreamConsumed()
        self.started = True
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.exchange.client_gone = True
                raise ClientDisconnected()
            chunk = message.get("body", b"")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                self.exchange.watch_disconnect(self.receive)
                return


# Most exchanges end within this; only longer ones pay for a disconnect-watching task.
WATCH_AFTER = 0.1


class Exchange:
    """Per-request bookkeeping: is the client still there, and is the response finished."""

    __slots__ = ("client_gone", "done", "task", "timer", "watcher")

    def __init__(self) -> None:
        self.client_gone = False
        self.done = False
        self.task = asyncio.current_task()
        self.timer: asyncio.TimerHandle | None = None
        self.watcher: asyncio.Task[None] | None = None

    def watch_disconnect(self, receive: Receive) -> None:
        """Once the body is read, `receive` only returns on disconnect: cancel the request then.

        The watcher starts only if the exchange is still running after `WATCH_AFTER`: a timer
        handle costs far less than a task, and a client gone from a short exchange costs nothing.
        """
        if self.timer is None and not self.done:
            self.timer = asyncio.get_running_loop().call_later(WATCH_AFTER, self._start_watcher, receive)

    def _start_watcher(self, receive: Receive) -> None:
        if not self.done:
            self.watcher = asyncio.get_running_loop().create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        message = await receive()
        while message["type"] == "http.request":  # the (empty) body of a request without one
            message = await receive()
        if message["type"] == "http.disconnect" and not self.done and self.task is not None:
            self.client_gone = True
            self.task.cancel()

    def finish(self) -> None:
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
        if self.watcher is not None and not self.watcher.done():
            self.watcher.cancel()


def with_response_headers(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    """`send`, adding `extra` to the response head (a policy's hook, e.g. sticky's Set-Cookie)."""

    async def send_with_headers(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message["headers"], *extra]
        await send(message)

    return send_with_headers


class Proxy:
    """The ASGI endpoint behind the catch-all route."""

    def __init__(
        self,
        settings: Settings,
        pool: Pool,
        balancer: Balancer,
        stats: Stats,
        router: Router | None = None,
    ) -> None:
        self.pool = pool
        self.cluster = Cluster(pool, balancer)  # the default pool and its policy
        self.router = router  # LB_ROUTES, None without a routes table
        self.stats = stats
        self.upstream = Upstream(settings)
        self.max_retries = settings.max_retries
        self.retry_delay = settings.retry_delay
        self.preserve_host = settings.preserve_host
        self.trusted = TrustedProxies(settings.trusted_proxies)
        self.access_log = settings.access_log

    @property
    def balancer(self) -> Balancer:
        return self.cluster.balancer

    @balancer.setter
    def balancer(self, balancer: Balancer) -> None:
        self.cluster = Cluster(self.pool, balancer)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        stats = self.stats
        stats.begin()
        tap = Tap(scope, receive, send)  # request id, byte counts, time to headers
        exchange = Exchange()
        status = 0
        backend: Backend | None = None
        attempts = 0
        try:
            status, backend, attempts = await self._handle(scope, tap.receive, tap.send, exchange, started)
        except asyncio.CancelledError:
            if not exchange.client_gone:
                raise
            if exchange.task is not None:
                exchange.task.uncancel()
            status = 499  # nginx's "client closed request", for the log and the counters only
        finally:
            exchange.finish()
            stats.end(backend, scope["method"], status, tap, started)
            if self.access_log and access_logger.isEnabledFor(logging.INFO):
                access_log(scope, tap, status, backend, attempts, started)

    async def _handle(
        self, scope: Scope, receive: Receive, send: Send, exchange: Exchange, started: float
    ) -> tuple[int, Backend | None, int]:
        method: str = scope["method"]
        client = scope.get("client")
        peer = client[0] if client else "unknown"
        trust = bool(self.trusted) and self.trusted.contains(peer)
        head = parse_request_headers(scope["headers"], trust)
        client_ip = self.trusted.client_ip(peer, head.forwarded_for) if trust else peer
        add_forwarding_headers(head, peer, client_ip, scope.get("scheme", "http"), trust)
        if head.chunked:
            head.headers.append((b"transfer-encoding", b"chunked"))
        raw_target: bytes = scope.get("raw_path") or scope["path"].encode()
        cluster = self.cluster
        if self.router is not None:  # path-based routing: a pool of its own, maybe a shorter path
            cluster, raw_target = self.router.route(raw_target, cluster)
        if scope.get("query_string"):
            raw_target += b"?" + scope["query_string"]

        body = ClientBody(receive, exchange) if head.has_body else None
        if body is None:
            exchange.watch_disconnect(receive)
        request_info = RequestInfo(scope, client_ip, trust)
        safe_after_send = method in IDEMPOTENT and body is None
        tried: set[Backend] = set()
        attempts = 0
        last_error = 503
        backend: Backend | None = None
        error: Exception | None = None

        while True:
            backend = self._choose(cluster, request_info, tried)
            if backend is None:
                return await self._fail(send, last_error, started), None, attempts
            attempts += 1
            if attempts > 1:
                self.stats.retry(error)
            sent_at = time.perf_counter() if cluster.observe is not None else 0.0
            response = await self._attempt(backend, method, raw_target, head.headers, body, head.host)
            if cluster.observe is not None and not isinstance(response, ClientDisconnected):
                # Policies that learn from response times (least_time): time to the response head.
                ok = isinstance(response, httpx.Response)
                cluster.observe(backend, time.perf_counter() - sent_at, ok)
            if isinstance(response, httpx.Response):
                break
            error = response
            tried.add(backend)
            self._record_failure(backend, error, method)
            if isinstance(error, ClientDisconnected):
                return 499, backend, attempts
            last_error = (
                504
                if isinstance(error, httpx.TimeoutException) and not isinstance(error, httpx.PoolTimeout)
                else 502
            )
            retryable = not (body is not None and body.started) and (
                isinstance(error, CONNECT_PHASE)
                or getattr(error, "request_sent", True) is False
                or (safe_after_send and not isinstance(error, httpx.TimeoutException))
            )
            if not retryable or attempts > self.max_retries:
                return await self._fail(send, last_error, started), backend, attempts
            if self.retry_delay:
                await asyncio.sleep(self.retry_delay)

        if cluster.response_headers is not None:  # e.g. sticky's Set-Cookie
            extra = cluster.response_headers(backend, request_info)
            if extra:
                send = with_response_headers(send, extra)
        return await self._relay(response, backend, method, send, exchange, started), backend, attempts

    def _choose(self, cluster: Cluster, request: RequestInfo, tried: set[Backend]) -> Backend | None:
        eligible = cluster.candidates()
        if not eligible:
            return None
        if tried:
            # Each retry goes to a backend not tried yet, when one exists.
            untried = [b for b in eligible if b not in tried]
            if untried:
                eligible = untried
        return cluster.balancer.pick(eligible, request)

    async def _attempt(
        self,
        backend: Backend,
        method: str,
        raw_target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: ClientBody | None,
        host: bytes,
    ) -> httpx.Response | Exception:
        if not self.preserve_host or not host:
            headers = [(n, v) for n, v in headers if n != b"host"]
            headers.append((b"host", backend.host_header))
        request = self.upstream.request(
            method,
            backend.origin,
            headers,
            body if body is not None else EMPTY_BODY,
            backend.base_path + raw_target,
        )
        backend.total_requests += 1
        backend.in_flight += 1
        try:
            return await self.upstream.send(request)
        except (httpx.HTTPError, ClientDisconnected) as exc:
            backend.in_flight -= 1
            return exc
        except BaseException:
            backend.in_flight -= 1
            raise

    async def _relay(
        self,
        response: httpx.Response,
        backend: Backend,
        method: str,
        send: Send,
        exchange: Exchange,
        started: float,
    ) -> int:
        status = response.status_code
        stats = self.stats
        sent = 0
        try:
            headers, expected = filter_response_headers(lower_headers(response), status)
            await send({"type": "http.response.start", "status": status, "headers": headers})
            stats.observe_response(backend)
            if method != "HEAD" and status not in NO_BODY_STATUS:
                # With a Content-Length the last chunk is known when it arrives: send it as the
                # final message, saving uvicorn a write per response.
                try:
                    stream = response.stream
                    assert isinstance(stream, httpx.AsyncByteStream)
                    async for chunk in stream:
                        sent += len(chunk)
                        if sent == expected:
                            exchange.done = True
                            await send({"type": "http.response.body", "body": chunk, "more_body": False})
                            return status
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                except httpx.HTTPError as exc:
                    # Ending the response normally would make a truncated body look complete:
                    # return without finishing it, and uvicorn closes the client connection.
                    stats.upstream_error(backend, exc)
                    logger.warning(
                        "backend %s broke off the response after %d bytes (%s); aborting the client",
                        backend.url,
                        sent,
                        type(exc).__name__,
                    )
                    exchange.done = True
                    return status
            exchange.done = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return status
        finally:
            backend.in_flight -= 1
            await response.aclose()

    async def _fail(self, send: Send, status: int, started: float) -> int:
        start, body = ERRORS[status]
        self.stats.observe_error(status)
        await send(start)
        await send(body)
        return status

    def _record_failure(self, backend: Backend, error: Exception, method: str) -> None:
        if isinstance(error, ClientDisconnected):
            return
        self.stats.upstream_error(backend, error)
        logger.warning("%s to backend %s failed: %s: %s", method, backend.url, type(error).__name__, error)
