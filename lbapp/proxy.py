"""The catch-all route: pick a backend, stream the request to it, stream its answer back.

Raw ASGI rather than `StreamingResponse`: it costs one task per request (the disconnect
watcher) instead of a task group, and lets a broken upstream body abort the client connection
instead of ending it cleanly. Retries follow one rule: a request is sent again only if nothing
of it reached a backend, or it is safe to repeat (an idempotent method without a body, or any
request with an `Idempotency-Key` whose body could be kept for a replay), and never once the
response began; a retry budget bounds how many requests may be retrying at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
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
from .pool import Backend, Pool, wake_one
from .ratelimit import Decision
from .routing import Cluster, Router
from .settings import Settings
from .streaming import ClientBody, ClientDisconnected, Exchange
from .upstream import Upstream, lower_headers

logger = logging.getLogger("lbapp.proxy")
access_logger = logging.getLogger("lbapp.access")  # only its enabled flag: observe.access_log writes

Scope = dict[str, Any]
Receive = Any
Send = Any

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
CONNECT_PHASE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
EMPTY_BODY = httpx.ByteStream(b"")


class Full:
    """`_choose`'s answer when every candidate is at `LB_BACKEND_MAX_CONNS`."""


FULL = Full()


def json_error(status: int, message: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A complete ASGI answer: short JSON, and `Retry-After: 1` on a 503."""
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
OVERLOADED = json_error(503, "all backends are at capacity")
RATE_LIMITED = json_error(429, "rate limited")
LIMITER_DOWN = json_error(503, "rate limiter unavailable")


def has_idempotency_key(headers: list[tuple[bytes, bytes]]) -> bool:
    """The request says it is safe to repeat (draft-ietf-httpapi-idempotency-key-header)."""
    return any(name == b"idempotency-key" and value.strip() for name, value in headers)


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
        # Retry budget: requests retrying at once <= max(minimum, budget% of live requests).
        self.retry_budget = settings.retry_budget / 100.0
        self.retry_budget_min = settings.retry_budget_min
        self.retrying = 0
        self.queue_size = settings.queue_size
        self.queue_timeout = settings.queue_timeout
        self.preserve_host = settings.preserve_host
        self.trusted = TrustedProxies(settings.trusted_proxies)
        self.access_log = settings.access_log

    @property
    def balancer(self) -> Balancer:
        return self.cluster.balancer

    @balancer.setter
    def balancer(self, balancer: Balancer) -> None:
        limiter = self.cluster.limiter
        self.cluster = Cluster(self.pool, balancer)
        self.cluster.limiter = limiter

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
            status, backend, attempts = await self._handle(scope, tap, exchange, started)
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
        self, scope: Scope, tap: Tap, exchange: Exchange, started: float
    ) -> tuple[int, Backend | None, int]:
        receive, send = tap.receive, tap.send
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
        limiter = cluster.limiter
        if limiter is not None:  # before a backend is chosen: a refusal costs no backend anything
            decision = await limiter.check(scope["headers"], client_ip)
            if decision.allowed and not decision.error:
                tap.rate_limit = "pass"
            else:
                self.stats.rate_limit(limiter.route, decision.allowed, decision.error)
                tap.rate_limit = "error" if decision.error else "limited"
                if not decision.allowed:
                    return await self._refuse(send, decision), None, 0
            send = with_response_headers(send, decision.headers())

        idempotency_key = method not in IDEMPOTENT and has_idempotency_key(head.headers)
        body = ClientBody(receive, exchange, idempotency_key) if head.has_body else None
        if body is None:
            exchange.watch_disconnect(receive)
        request_info = RequestInfo(scope, client_ip, trust)
        # After the request was sent, only what is safe to repeat is sent again.
        safe_after_send = (method in IDEMPOTENT and body is None) or idempotency_key
        tried: set[Backend] = set()
        attempts = 0
        last_error = 503
        backend: Backend | None = None
        error: Exception | None = None
        pool = cluster.pool
        retrying = False

        try:
            while True:
                choice = self._choose(cluster, request_info, tried)
                if choice is FULL:
                    choice = await self._queue(cluster, request_info, tried)
                    if choice is FULL:
                        return await self._overloaded(send), backend, attempts
                if choice is None:
                    return await self._fail(send, last_error, started), backend, attempts
                assert isinstance(choice, Backend)
                backend = choice
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
                    # Passive outlier detection: a couple of int operations per answer.
                    if response.status_code in pool.outlier_statuses:
                        pool.record_failure(backend, f"status {response.status_code}")
                    else:
                        backend.errors_in_row = 0
                    break
                error = response
                tried.add(backend)
                if isinstance(error, ClientDisconnected):
                    return 499, backend, attempts
                self._record_failure(backend, error, method)
                pool.record_failure(backend, type(error).__name__)
                last_error = (
                    504
                    if isinstance(error, httpx.TimeoutException) and not isinstance(error, httpx.PoolTimeout)
                    else 502
                )
                retryable = not (body is not None and body.started and not body.replayable) and (
                    isinstance(error, CONNECT_PHASE)
                    or getattr(error, "request_sent", True) is False
                    or (safe_after_send and not isinstance(error, httpx.TimeoutException))
                )
                if not retryable or attempts > self.max_retries:
                    return await self._fail(send, last_error, started), backend, attempts
                if not retrying:
                    # The retry budget: a request holds one retry slot from its first retry on.
                    budget = max(self.retry_budget_min, self.stats.in_flight * self.retry_budget)
                    if self.retrying >= budget:
                        self.stats.retry_denied()
                        return await self._fail(send, last_error, started), backend, attempts
                    retrying = True
                    self.retrying += 1
                if self.retry_delay:
                    await asyncio.sleep(self.retry_delay)
        finally:
            if retrying:
                self.retrying -= 1

        if cluster.response_headers is not None:  # e.g. sticky's Set-Cookie
            extra = cluster.response_headers(backend, request_info)
            if extra:
                send = with_response_headers(send, extra)
        return await self._relay(response, backend, pool, method, send, exchange, started), backend, attempts

    def _choose(self, cluster: Cluster, request: RequestInfo, tried: set[Backend]) -> Backend | Full | None:
        """The policy's pick among the candidates below their in-flight cap; FULL when none is."""
        eligible = cluster.candidates()
        if not eligible:
            return None
        if tried:
            # Each retry goes to a backend not tried yet, when one exists.
            untried = [b for b in eligible if b not in tried]
            if untried:
                eligible = untried
        cap = cluster.pool.max_conns
        if cap:  # circuit breaking: a backend at its cap is skipped
            below = [b for b in eligible if b.in_flight < cap]
            if not below:
                return FULL
            if len(below) < len(eligible):
                eligible = below
        return cluster.balancer.pick(eligible, request)

    async def _queue(
        self, cluster: Cluster, request: RequestInfo, tried: set[Backend]
    ) -> Backend | Full | None:
        """Every candidate is at its cap: wait in the pool's bounded FIFO queue for a free slot."""
        waiters = cluster.pool.waiters
        if len(waiters) >= self.queue_size:
            return FULL
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.queue_timeout
        first = True
        while True:
            waiter: asyncio.Future[None] = loop.create_future()
            if first:
                waiters.append(waiter)
            else:
                waiters.appendleft(waiter)  # woken but beaten to the slot: keep its place
            first = False
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError:
                if waiter.done() and not waiter.cancelled():
                    wake_one(waiters)  # woken just as time ran out: pass the free slot on
                return FULL
            finally:
                if not waiter.done():
                    waiter.cancel()
                    with contextlib.suppress(ValueError):
                        waiters.remove(waiter)
            choice = self._choose(cluster, request, tried)
            if choice is not FULL:
                # Maybe more than one slot is free (or the candidates changed): wake the next
                # waiter too; one that finds nothing goes back to the front, so order is kept.
                if waiters:
                    wake_one(waiters)
                return choice

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
            if backend.waiters:
                wake_one(backend.waiters)
            return exc
        except BaseException:
            backend.in_flight -= 1
            if backend.waiters:
                wake_one(backend.waiters)
            raise

    async def _relay(
        self,
        response: httpx.Response,
        backend: Backend,
        pool: Pool,
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
                    pool.record_failure(backend, f"broke off the response: {type(exc).__name__}")
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
            if backend.waiters:
                wake_one(backend.waiters)
            await response.aclose()

    async def _refuse(self, send: Send, decision: Decision) -> int:
        """429 (or 503 when the store did not answer and the fail policy is closed)."""
        start, body = LIMITER_DOWN if decision.error else RATE_LIMITED
        status: int = start["status"]
        if decision.error:
            self.stats.observe_error(status)
        await send({**start, "headers": [*start["headers"], *decision.headers()]})
        await send(body)
        return status

    async def _overloaded(self, send: Send) -> int:
        """503 with Retry-After: every backend stayed at its cap for the whole queue timeout."""
        start, body = OVERLOADED
        self.stats.observe_error(503)
        await send(start)
        await send(body)
        return 503

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
