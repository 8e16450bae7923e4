"""A lean HTTP/1.1 client transport for httpx, built on raw asyncio and httptools.

httpcore's pool does O(connections x waiters) bookkeeping per request, which dominates the CPU of a
busy reverse proxy. ``LeanTransport`` is the httpx interface over three parts: the HTTP/1.1
protocol (connection.py), the per-origin O(1) pool and its body stream (connection_pool.py), and
here the exchange itself: encode the head, send it and the body, wait for the response head.

Requests are sent verbatim: the caller owns Host, framing headers and the target
(``request.extensions["target"]``). Every exception raised carries ``request_sent: bool`` so a proxy
can tell whether retrying is safe. A reused keep-alive connection that turns out closed is retried
once internally, on a new connection, only when that cannot deliver the request twice (Go's
``Transport.shouldRetryRequest``): no byte of the request was written, or the request is replayable
(GET, HEAD, OPTIONS, TRACE or an ``Idempotency-Key`` header, and no body).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterable
from typing import cast

import httpx

from .connection import DISCONNECTED, Connection, transport_error
from .connection_pool import LeanResponse, OriginPool, ResponseBody
from .deadlines import Deadlines
from .rawheaders import adopt
from .request_body import send_body

__all__ = ["LeanResponse", "LeanTransport", "origin_key", "replayable"]

_Key = tuple[str, str, int]
REPLAYABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


def origin_key(url: httpx.URL) -> _Key:
    """(scheme, host, port) of `url`, the port defaulted: what one `OriginPool` serves."""
    return (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))


def replayable(method: str, headers: list[tuple[bytes, bytes]]) -> bool:
    """Safe to send again after it may have reached the server (Go's ``Request.isReplayable``)."""
    if method in REPLAYABLE_METHODS:
        return True
    return any(name.lower() == b"idempotency-key" and value.strip() for name, value in headers)


class LeanTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 transport with an O(1) connection pool; see the module docstring."""

    def __init__(
        self,
        *,
        max_connections: int | None = None,
        max_keepalive: int | None = None,
        keepalive_expiry: float = 4.0,
        connect_timeout: float = 5.0,
        read_timeout: float = 10.0,
        write_timeout: float = 10.0,
        pool_timeout: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._max_connections = max_connections
        self._max_keepalive = max_keepalive
        self._expiry = keepalive_expiry
        self._defaults: dict[str, float | None] = {
            "connect": connect_timeout,
            "read": read_timeout,
            "write": write_timeout,
            "pool": pool_timeout,
        }
        self._pools: dict[_Key, OriginPool] = {}
        self._ssl = ssl_context  # https only; ssl.create_default_context() when None
        self._closed = False
        self._deadlines: Deadlines | None = None  # the connections' timeouts, one timer (first use)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        scheme = url.scheme
        if scheme != "http" and scheme != "https":
            raise httpx.UnsupportedProtocol(f"Unsupported URL scheme {scheme!r}.", request=request)
        key = origin_key(url)
        timeouts = self._defaults
        ext = request.extensions.get("timeout")
        if ext:
            timeouts = {**timeouts, **ext}
        target = request.extensions.get("target") or url.raw_path
        stream = cast(AsyncIterable[bytes], request.stream)
        lean = await self.exchange(
            key, request.method, target, request.headers.raw, stream, timeouts, request
        )
        response = httpx.Response(
            lean.status_code,
            stream=lean.stream,
            extensions={"http_version": lean.http_version, "reason_phrase": lean.reason},
        )
        # The parser already gave (raw name, lower name, value): skip httpx's re-normalisation.
        adopt(response.headers, lean.headers)
        return response

    async def exchange(
        self,
        key: _Key,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        stream: AsyncIterable[bytes] | None,
        timeouts: dict[str, float | None],
        request: httpx.Request | None = None,
    ) -> LeanResponse:
        """One request to the origin `key` = (scheme, host, port): the response head and body.

        What `handle_async_request` does, for a caller that has the parts rather than an
        `httpx.Request` (the proxy: no request or response objects of httpx's per exchange).
        `stream` is the body (None: none); `timeouts` has the keys connect, read, write and pool;
        errors are the same httpx exceptions (their `request` is `request`, possibly None).
        """
        if self._closed:
            raise RuntimeError("LeanTransport is closed.")
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = OriginPool(self._max_connections, self._max_keepalive, self._expiry)
        head, chunked, has_body = self._encode_head(method, target, headers)
        conn = await pool.acquire(timeouts["pool"], request)
        retried = False
        while True:
            if conn is None:
                conn = await self._connect(pool, key, timeouts["connect"], request)
            try:
                return await self._exchange(
                    pool, conn, method, request, head, chunked, has_body, stream, timeouts
                )
            except (httpx.RemoteProtocolError, httpx.NetworkError):
                conn.close()
                if retried or not self._may_resend(conn, method, headers, has_body):
                    pool.release(conn)
                    raise
                retried, conn = True, None  # stale keep-alive connection: keep its slot, retry once
            except BaseException:
                conn.close()
                pool.release(conn)
                raise

    @staticmethod
    def _may_resend(
        conn: Connection, method: str, headers: list[tuple[bytes, bytes]], has_body: bool
    ) -> bool:
        """A reused connection failed before any response byte: may the request go out again?"""
        if not conn.reused or conn.received:
            return False  # a fresh connection's failure, or the server answered: not stale
        return not conn.sent or (not has_body and replayable(method, headers))

    async def _exchange(
        self,
        pool: OriginPool,
        conn: Connection,
        method: str,
        request: httpx.Request | None,
        head: bytes,
        chunked: bool,
        has_body: bool,
        stream: AsyncIterable[bytes] | None,
        timeouts: dict[str, float | None],
    ) -> LeanResponse:
        conn.begin(method == "HEAD")
        if conn.closed:
            raise transport_error(
                httpx.WriteError, "Connection closed before the request was sent.", request, False
            )
        if not has_body or stream is None:
            conn.write(head)
        else:
            await send_body(conn, request, stream, head, chunked, timeouts["write"])
        while not conn.headers_done:
            conn.raise_error(request)
            if conn.closed:
                raise transport_error(httpx.RemoteProtocolError, DISCONNECTED, request, True)
            try:
                await conn.wait(timeouts["read"])
            except TimeoutError:
                raise transport_error(
                    httpx.ReadTimeout, "Timed out waiting for the response.", request, True
                ) from None
        if conn.done:  # whole response already here: the body keeps the chunks, the pool gets the socket
            body = ResponseBody(pool, None, conn.chunks, request, None)
            conn.chunks, conn.buffered = deque(), 0
            pool.release(conn)
        else:
            body = ResponseBody(pool, conn, conn.chunks, request, timeouts["read"])
        version = b"HTTP/1.1" if conn.version == "1.1" else b"HTTP/" + conn.version.encode()
        return LeanResponse(conn.status, conn.headers, body, version, conn.reason)

    @staticmethod
    def _encode_head(
        method: str, target: bytes, headers: list[tuple[bytes, bytes]]
    ) -> tuple[bytes, bool, bool]:
        """Serialise the request head verbatim; return (head, chunked, has_body)."""
        parts = [method.encode("ascii"), b" ", target, b" HTTP/1.1\r\n"]
        chunked = False
        length: bytes | None = None
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
            n = len(name)
            if n == 14 and name.lower() == b"content-length":
                length = value.strip()
            elif n == 17 and name.lower() == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
        parts.append(b"\r\n")
        return b"".join(parts), chunked, chunked or (length is not None and length != b"0")

    async def _connect(
        self, pool: OriginPool, key: _Key, seconds: float | None, request: httpx.Request | None
    ) -> Connection:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        ctx = None
        if scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
                self._ssl.set_alpn_protocols(["http/1.1"])
            ctx = self._ssl
        try:
            async with asyncio.timeout(seconds):
                if self._deadlines is None or self._deadlines.loop is not loop:
                    self._deadlines = Deadlines(loop)
                deadlines = self._deadlines
                _, conn = await loop.create_connection(
                    lambda: Connection(loop, deadlines),
                    host,
                    port,
                    ssl=ctx,
                    server_hostname=host if ctx else None,
                )
        except TimeoutError:
            pool.free_slot()
            raise transport_error(
                httpx.ConnectTimeout, f"Timed out connecting to {host}:{port}.", request, False
            ) from None
        except OSError as exc:
            pool.free_slot()
            raise transport_error(
                httpx.ConnectError, f"Cannot connect to {host}:{port}: {exc}", request, False
            ) from exc
        except BaseException:
            pool.free_slot()
            raise
        return conn

    def origin_pool(self, scheme: str, host: str, port: int) -> OriginPool | None:
        """The connection pool of one origin, for inspection (None before its first request)."""
        return self._pools.get((scheme, host, port))

    async def aclose(self) -> None:
        self._closed = True
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
