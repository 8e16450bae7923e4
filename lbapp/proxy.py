"""The catch-all route: prepare the request, try backends until one answers, relay its answer.

Like Caddy's reverse proxy: `prepare` turns the client's request into the upstream one (headers
filtered, forwarding headers added, the route's cluster and target chosen); the attempt loop
picks a backend through the cluster, sends, and on failure asks the retry rules (retry.py)
whether to go on; `relay` streams the backend's answer back. Raw ASGI rather than
`StreamingResponse`: no task group per request, and a broken upstream body can abort the client
connection instead of ending it cleanly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable
from typing import Any, cast

import httpx

from .admission import Full
from .answers import AT_CAPACITY, BAD_PATH, OVERLOADED, UPSTREAM_ERRORS, Answer, send_answer
from .backend import Backend
from .cluster import Cluster, Clusters
from .deadlines import Deadlines
from .frontdoor import CLIENT_ERRORS, FrontDoor, normalize
from .headers import (
    NO_BODY_STATUS,
    RequestHead,
    TrustedProxies,
    add_forwarding_headers,
    filter_response_headers,
    parse_request_headers,
)
from .metrics import Stats
from .observe import AccessLog, Tap
from .policy import RequestInfo
from .requestid import HEADER as REQUEST_ID
from .retry import (
    DENIED,
    RETRY,
    Attempts,
    RetryBudget,
    RetryPolicy,
    error_status,
)
from .streaming import ClientBody, ClientError, Exchange
from .upstream import Reply, Upstream, response_headers

logger = logging.getLogger("lbapp.proxy")

Scope = dict[str, Any]
Receive = Any
Send = Any


class Prepared:
    """The upstream request as `prepare` built it."""

    __slots__ = ("cluster", "extra", "head", "info", "safe", "target")

    def __init__(self, cluster: Cluster, head: RequestHead, target: bytes, info: RequestInfo, safe: bool):
        self.cluster = cluster
        self.extra: list[tuple[bytes, bytes]] = []  # response headers to add (e.g. the rate limit's)
        self.head = head
        self.target = target  # the request-line target sent upstream (after the backend's base path)
        self.info = info  # what the policy may look at
        self.safe = safe  # may be sent again after a backend received it


class Proxy:
    """The ASGI endpoint behind the catch-all route."""

    def __init__(
        self,
        clusters: Clusters,
        upstream: Upstream,
        stats: Stats,
        *,
        retry: RetryPolicy | None = None,
        budget: RetryBudget | None = None,
        trusted: TrustedProxies | None = None,
        preserve_host: bool = True,
        access_log: AccessLog | None = None,
        front_door: FrontDoor | None = None,
    ) -> None:
        self.clusters = clusters
        self.upstream = upstream
        self.stats = stats
        self.retry = retry or RetryPolicy()
        self.budget = budget or RetryBudget()
        self.trusted = trusted or TrustedProxies([])
        self.preserve_host = preserve_host
        self.access_log = access_log
        self.front_door = front_door or FrontDoor()
        # Set by the lifespan (see `Exchange`); without one, each request makes its own.
        self.loop: asyncio.AbstractEventLoop | None = None
        self.deadlines: Deadlines | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        stats = self.stats
        stats.begin()
        tap = Tap(scope, receive, send)  # request id, byte counts, time to headers
        exchange = Exchange(self.loop, self.deadlines)
        status = 0
        attempts: Attempts | None = None
        try:
            limit = self.front_door.max_in_flight
            prepared = self.prepare(scope) if not limit or stats.in_flight <= limit else OVERLOADED
            if isinstance(prepared, Prepared) and prepared.cluster.limiter is not None:  # rate limit
                prepared = await prepared.cluster.limiter.admit(prepared, tap)
            if isinstance(prepared, Prepared):
                with Attempts(self.retry, self.budget) as attempts:
                    status = await self._handle(prepared, scope["method"], tap, exchange, attempts)
            else:  # refused before any backend was chosen
                status = await self._answer(tap.send, prepared)
        except asyncio.CancelledError:
            if not exchange.client_gone:
                raise
            if exchange.task is not None:
                exchange.task.uncancel()
            status = 499  # nginx's "client closed request", for the log and the counters only
        finally:
            exchange.finish()
            backend = attempts.backend if attempts is not None else None
            stats.end(backend, scope["method"], status, tap, started)
            if self.access_log is not None:
                self.access_log.write(scope, tap, status, backend, attempts.count if attempts else 0, started)

    def prepare(self, scope: Scope) -> Prepared | Answer:
        """The client's request as it goes upstream (headers, cluster, target, policy input), or
        the answer to a request that is not forwarded."""
        client = scope.get("client")
        peer = client[0] if client else "unknown"
        trust = bool(self.trusted) and self.trusted.contains(peer)
        head = parse_request_headers(scope["headers"], trust)
        refused = self.front_door.refusal(scope, head)
        if refused is not None:
            return refused
        client_ip = self.trusted.client_ip(peer, head.forwarded_for) if trust else peer
        add_forwarding_headers(head, peer, client_ip, scope.get("scheme", "http"), trust)
        if head.chunked:
            head.headers.append((b"transfer-encoding", b"chunked"))
        path: bytes = scope.get("raw_path") or scope["path"].encode()
        routed = path if b"." not in path and b"%2" not in path else normalize(path)
        if routed is None:
            return BAD_PATH
        cluster = self.clusters.route(routed)
        target = cluster.target(path, routed)
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        method: str = scope["method"]
        safe = RetryPolicy.request_is_safe(method, head.has_body, head.headers)
        info = RequestInfo(scope, client_ip, trust)
        return Prepared(cluster, head, target, info, safe)

    async def _handle(
        self, prepared: Prepared, method: str, tap: Tap, exchange: Exchange, attempts: Attempts
    ) -> int:
        """The attempt loop: pick, send, and on failure retry while the rules allow it."""
        receive, send = tap.receive, tap.send  # lbapp's own answers; a response goes to `relay`
        cluster = prepared.cluster
        pool = cluster.pool
        door = self.front_door
        body: ClientBody | None = None
        stream: httpx.AsyncByteStream | None = None
        if prepared.head.has_body:
            body = ClientBody(receive, exchange, prepared.safe, door.body_timeout, door.max_body)
            try:  # a small body is read whole before any backend is chosen
                buffered = await body.buffer(door.request_buffer) if door.request_buffer else None
            except ClientError as error:
                return await self._client_error(send, error)
            stream = body
            if buffered is not None:
                stream, body = buffered, None  # in memory: sent in one write, and again if need be
        else:
            exchange.watch_disconnect(receive)
        last_status = 503  # nothing tried: every backend is down
        while True:
            choice = await cluster.admit(prepared.info, attempts.tried)
            if isinstance(choice, Full):
                return await self._answer(send, AT_CAPACITY)
            if choice is None:
                return await self._answer(send, UPSTREAM_ERRORS[last_status])
            backend = attempts.backend = choice
            attempts.count += 1
            pool.lease(backend)
            try:
                sent_at = time.perf_counter()
                result = await self._attempt(backend, method, prepared, stream)
                if not isinstance(result, Exception):
                    cluster.answered(backend, result.status_code, time.perf_counter() - sent_at)
                    extra = cluster.policy_headers(backend, prepared.info)
                    if extra:
                        prepared.extra.extend(extra)
                    return await self.relay(result, backend, cluster, method, tap, exchange, prepared.extra)
            finally:
                pool.release(backend)
            if isinstance(result, ClientError):
                return await self._client_error(send, result)
            attempts.tried.add(backend)
            self.stats.upstream_error(backend, result)
            logger.warning(
                "%s to backend %s failed: %s: %s", method, backend.url, type(result).__name__, result
            )
            cluster.failed(backend, type(result).__name__, time.perf_counter() - sent_at)
            last_status = error_status(result)
            decision = attempts.next_attempt(result, body, prepared.safe, self.stats.in_flight)
            if decision != RETRY:
                if decision == DENIED:
                    self.stats.retry_denied()
                return await self._answer(send, UPSTREAM_ERRORS[last_status])
            self.stats.retry(result)
            if self.retry.delay:
                await asyncio.sleep(self.retry.delay)

    async def _attempt(
        self, backend: Backend, method: str, prepared: Prepared, stream: httpx.AsyncByteStream | None
    ) -> Reply | Exception:
        """Send the request to `backend`: its response head, or the error that prevented it."""
        head = prepared.head
        headers = head.headers
        if not self.preserve_host or not head.host:
            headers = [(n, v) for n, v in headers if n != b"host"]
            headers.append((b"host", backend.host_header))
        target = backend.base_path + prepared.target
        try:
            return await self.upstream.send(
                method, backend.origin, backend.origin_key, headers, stream, target
            )
        except (httpx.HTTPError, ClientError) as exc:
            return exc

    async def relay(
        self,
        response: Reply,
        backend: Backend,
        cluster: Cluster,
        method: str,
        tap: Tap,
        exchange: Exchange,
        extra: list[tuple[bytes, bytes]],
    ) -> int:
        """Stream the backend's answer to the client; a body the backend breaks off aborts the client.

        Straight to the server's `send`, with the tap's accounting done here (observe.Tap)."""
        status = response.status_code
        send = tap.downstream
        sent = 0
        try:
            headers, expected = filter_response_headers(response_headers(response), status)
            if extra:
                headers += extra
            headers.append((REQUEST_ID, tap.request_id))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            tap.headers_at = time.perf_counter()
            self.stats.observe_response()
            if method != "HEAD" and status not in NO_BODY_STATUS:
                # With a Content-Length the last chunk is known when it arrives: send it as the
                # final message, saving uvicorn a write per response.
                try:
                    stream = cast(AsyncIterable[bytes], response.stream)
                    async for chunk in stream:
                        sent += len(chunk)
                        tap.bytes_out = sent
                        if sent == expected:
                            exchange.done = True
                            await send({"type": "http.response.body", "body": chunk, "more_body": False})
                            return status
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                except httpx.HTTPError as exc:
                    # Ending the response normally would make a truncated body look complete:
                    # return without finishing it, and uvicorn closes the client connection.
                    self.stats.upstream_error(backend, exc)
                    cluster.pool.record_failure(backend, f"broke off the response: {type(exc).__name__}")
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
            await response.aclose()

    async def _client_error(self, send: Send, error: ClientError) -> int:
        """The client broke off (499, nothing to answer), stalled (408) or sent too much (413)."""
        answer = CLIENT_ERRORS.get(type(error))
        return 499 if answer is None else await send_answer(send, answer)

    async def _answer(self, send: Send, answer: Answer) -> int:
        """One of lbapp's own error answers (502/503/504), counted."""
        self.stats.observe_error(answer[0]["status"])
        return await send_answer(send, answer)
