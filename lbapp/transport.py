"""A lean HTTP/1.1 client transport for httpx, built on raw asyncio and httptools.

httpcore's pool does O(connections x waiters) bookkeeping per request, which dominates the CPU of a
busy reverse proxy.  ``LeanTransport`` keeps per origin a LIFO deque of idle connections and a FIFO
deque of waiters, so acquiring and releasing a connection is O(1) (amortised: dead entries are
skipped lazily).  Requests are sent verbatim: the caller owns Host, framing headers and the target
(``request.extensions["target"]``).  Every exception raised carries ``request_sent: bool`` so a proxy
can tell whether retrying is safe; stale keep-alive connections are retried once internally.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any, cast

import httptools
import httpx

__all__ = ["LeanTransport"]

_HIGH_WATER = 256 * 1024  # pause reading above this many unconsumed body bytes ...
_LOW_WATER = 64 * 1024  # ... and resume once the consumer drained below this
_DISCONNECTED = "Server disconnected without sending a response."
_Key = tuple[str, str, int]


def _error(cls: type[httpx.TransportError], msg: str, request: httpx.Request, sent: bool) -> Exception:
    """Build an httpx exception that tells the caller whether any request byte hit the wire."""
    exc = cls(msg, request=request)
    exc.request_sent = sent  # type: ignore[attr-defined]  # documented extra attribute
    return exc


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class _Pool:
    """Connections of one origin; ``total`` counts live + connecting connections (the slots in use)."""

    __slots__ = ("dead", "idle", "total", "waiters")

    def __init__(self) -> None:
        self.idle: deque[_Conn] = deque()
        self.waiters: deque[asyncio.Future[_Conn | None]] = deque()
        self.dead = 0  # waiters that timed out or were cancelled but are still queued
        self.total = 0

    def next_waiter(self) -> asyncio.Future[_Conn | None] | None:
        """Pop the first waiter still waiting (FIFO), skipping abandoned ones."""
        waiters = self.waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                return fut
            self.dead -= 1
        return None

    def forget(self) -> None:
        """A queued waiter gave up: compact the queue once most of it is dead (amortised O(1))."""
        self.dead += 1
        if self.dead * 2 > len(self.waiters):
            self.waiters = deque(fut for fut in self.waiters if not fut.done())
            self.dead = 0


class _Conn(asyncio.Protocol):
    """One TCP connection; the protocol callbacks fill per-response state that the awaiting side reads."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: _Pool) -> None:
        self.loop = loop
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.closed = False  # socket gone (EOF, error or closed by us)
        self.active = False  # a request owns this connection
        self.reused = False
        self.idle_since = 0.0
        self.waiter: asyncio.Future[None] | None = None
        self.write_paused = False
        self.read_paused = False
        self._reset_message()
        self.begin(False)

    def begin(self, head: bool) -> None:
        """Reset the per-response state before sending a request."""
        self.active = True
        self.head = head
        self.sent = False  # some request byte was written
        self.received = False  # some response byte arrived
        self.headers_done = False
        self.done = False  # the whole response has arrived
        self.keep_alive = False
        self.error: tuple[type[httpx.TransportError], str] | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.remaining = 0  # > 0: Content-Length body bytes to pass through without the parser
        if self.parser is None:
            self.parser = httptools.HttpResponseParser(self)

    def _reset_message(self) -> None:
        """Per-message state; on_message_begin calls it again for each (interim or final) response."""
        self.status = 0
        self.version = "1.1"
        self.reason = b""
        self.headers: list[tuple[bytes, bytes, bytes]] = []  # httpx.Headers' own layout
        self.content_length = -1
        self.chunked = False
        self.conn_close = False

    # -- asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):  # not a TCP socket
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.remaining:  # fast path: raw Content-Length body, no parser and no copy
            n = len(data)
            if n < self.remaining:
                self.remaining -= n
                self._push(data)
            else:
                if n > self.remaining:  # trailing garbage: never reuse this connection
                    data, self.keep_alive = data[: self.remaining], False
                self.remaining = 0
                self._push(data)
                self._finish()
            return
        if not self.active or self.parser is None or self.error is not None:
            self._fail(httpx.RemoteProtocolError, "Received data on an idle connection.")
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(httpx.RemoteProtocolError, "Protocol upgrades (101) are not supported.")
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError, f"Malformed response: {exc}")
        else:
            if self.content_length > 0 and self.headers_done and not self.done:
                self.remaining = self.content_length  # rest of the body bypasses the parser
                self.parser = None

    def eof_received(self) -> bool | None:
        return None  # let the transport close; connection_lost decides what EOF means

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.write_paused = False
        if not self.active or self.done or self.error is not None:
            pass
        elif not self.headers_done:
            msg = (
                "Server disconnected in the middle of the response head." if self.received else _DISCONNECTED
            )
            self.error = (httpx.RemoteProtocolError, msg)
        elif exc is None and self.content_length < 0 and not self.chunked:
            self.done = True  # read-until-close body ended normally
        elif exc is None:
            self.error = (httpx.RemoteProtocolError, "Server closed the connection mid-body.")
        else:
            self.error = (httpx.ReadError, f"Connection lost mid-body: {exc!r}")
        self._wake()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake()

    # -- httptools callbacks ----------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.done:  # bytes after a complete response (HEAD with body, pipelining...): stale framing
            self.keep_alive = False
        else:
            self._reset_message()

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        self.headers.append((name, lower, value))
        if lower == b"content-length":
            self.content_length = int(value)  # llhttp already validated it
        elif lower == b"transfer-encoding":
            self.chunked = value.lower().rstrip().endswith(b"chunked")
        elif lower == b"connection":
            self.conn_close = b"close" in value.lower()

    def on_headers_complete(self) -> None:
        parser = self.parser
        assert parser is not None
        status = parser.get_status_code()
        if status < 200 or self.done:
            return  # interim 1xx: keep reading for the final response
        self.status = status
        self.headers_done = True
        self.version = parser.get_http_version()
        if self.head:
            self.keep_alive = self.version == "1.1" and not self.conn_close
            self.parser = None  # llhttp would expect a body: use a fresh parser next time
            self._finish()
        else:
            self.keep_alive = self.version == "1.1" and parser.should_keep_alive()
            self._wake()

    def on_body(self, body: bytes) -> None:
        if self.done:
            self.keep_alive = False
            return
        if self.content_length > 0:
            self.content_length -= len(body)  # remainder seeds the parser bypass
        self._push(body)

    def on_message_complete(self) -> None:
        if self.headers_done and not self.done:
            self._finish()

    # -- helpers ----------------------------------------------------------------------------------
    def _push(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > _HIGH_WATER and not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()
        self._wake()

    def pop(self) -> bytes:
        data = self.chunks.popleft()
        self.buffered -= len(data)
        if self.read_paused and self.buffered < _LOW_WATER and not self.closed and self.transport is not None:
            self.read_paused = False
            self.transport.resume_reading()
        return data

    def _finish(self) -> None:
        self.done = True
        self._wake()

    def _fail(self, cls: type[httpx.TransportError], msg: str) -> None:
        if self.error is None and not self.done:
            self.error = (cls, msg)
        self.keep_alive = False
        self.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, seconds: float | None) -> None:
        """Sleep until a protocol callback wakes us; raise TimeoutError after ``seconds``."""
        fut = self.waiter = self.loop.create_future()
        handle = None if seconds is None else self.loop.call_later(seconds, _expire, fut)
        try:
            await fut
        finally:
            self.waiter = None
            if handle is not None:
                handle.cancel()

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.sent = True
        self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()  # never let unread or unsent data linger

    def raise_error(self, request: httpx.Request) -> None:
        if self.error is not None:
            cls, msg = self.error
            raise _error(cls, msg, request, self.sent)


class _Body(httpx.AsyncByteStream):
    """Response body: yields chunks as received and returns the connection to the pool when done."""

    __slots__ = ("_chunks", "_conn", "_owner", "_request", "_timeout")

    def __init__(
        self,
        owner: LeanTransport,
        conn: _Conn | None,
        chunks: deque[bytes],
        request: httpx.Request,
        seconds: float | None,
    ) -> None:
        self._owner = owner
        self._conn = conn  # None once released: only ``_chunks`` (already received) remain
        self._chunks = chunks
        self._request = request
        self._timeout = seconds

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        if conn is None:
            if self._chunks:
                return self._chunks.popleft()
            raise StopAsyncIteration
        try:
            while True:
                if conn.chunks:
                    return conn.pop()
                if conn.done:
                    self._release()
                    raise StopAsyncIteration
                conn.raise_error(self._request)
                if conn.closed:
                    raise _error(httpx.ReadError, "Connection closed.", self._request, True)
                try:
                    await conn.wait(self._timeout)
                except TimeoutError:
                    raise _error(
                        httpx.ReadTimeout, "Timed out reading the response body.", self._request, True
                    ) from None
        except BaseException:
            self._release()  # errors and cancellation: close now, never reuse
            raise

    def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._owner._release(conn)

    async def aclose(self) -> None:
        self._chunks.clear()
        self._release()


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
        self._pools: dict[_Key, _Pool] = {}
        self._ssl = ssl_context  # https only; ssl.create_default_context() when None
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise RuntimeError("LeanTransport is closed.")
        url = request.url
        scheme = url.scheme
        if scheme != "http" and scheme != "https":
            raise httpx.UnsupportedProtocol(f"Unsupported URL scheme {scheme!r}.", request=request)
        key = (scheme, url.host, url.port or (443 if scheme == "https" else 80))
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool()
        timeouts = self._defaults
        ext = request.extensions.get("timeout")
        if ext:
            timeouts = {**timeouts, **ext}
        head, chunked, has_body = self._encode_head(request)

        conn = await self._acquire(pool, timeouts["pool"], request)
        retried = False
        while True:
            if conn is None:
                conn = await self._connect(pool, key, timeouts["connect"], request)
            try:
                return await self._exchange(conn, request, head, chunked, has_body, timeouts)
            except (httpx.RemoteProtocolError, httpx.NetworkError):
                stale = conn.reused and not conn.received and (not has_body or not conn.sent)
                conn.close()
                if retried or not stale:
                    self._release(conn)
                    raise
                retried, conn = True, None  # stale keep-alive connection: keep its slot, retry once
            except BaseException:
                conn.close()
                self._release(conn)
                raise

    async def _exchange(
        self,
        conn: _Conn,
        request: httpx.Request,
        head: bytes,
        chunked: bool,
        has_body: bool,
        timeouts: dict[str, float | None],
    ) -> httpx.Response:
        conn.begin(request.method == "HEAD")
        if conn.closed:
            raise _error(httpx.WriteError, "Connection closed before the request was sent.", request, False)
        if not has_body:
            conn.write(head)
        else:
            await self._send_body(conn, request, head, chunked, timeouts["write"])
        while not conn.headers_done:
            conn.raise_error(request)
            if conn.closed:
                raise _error(httpx.RemoteProtocolError, _DISCONNECTED, request, True)
            try:
                await conn.wait(timeouts["read"])
            except TimeoutError:
                raise _error(
                    httpx.ReadTimeout, "Timed out waiting for the response.", request, True
                ) from None
        body = _Body(self, conn, conn.chunks, request, timeouts["read"])
        version = b"HTTP/1.1" if conn.version == "1.1" else b"HTTP/" + conn.version.encode()
        response = httpx.Response(
            conn.status,
            stream=body,
            extensions={"http_version": version, "reason_phrase": conn.reason},
        )
        # The parser already gave (raw name, lower name, value): skip httpx's re-normalisation.
        response.headers._list = conn.headers
        if conn.done:  # whole response already here: the body keeps the chunks, the pool gets the socket
            conn.chunks, conn.buffered = deque(), 0
            body._release()
        return response

    async def _send_body(
        self, conn: _Conn, request: httpx.Request, head: bytes, chunked: bool, seconds: float | None
    ) -> None:
        stream = cast(AsyncIterable[bytes], request.stream)
        if isinstance(stream, httpx.ByteStream):  # in-memory: coalesce into one write
            parts = [head]
            async for chunk in stream:
                if chunk:
                    parts.append(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
            if chunked:
                parts.append(b"0\r\n\r\n")
            conn.write(b"".join(parts))
            await self._drain(conn, request, seconds)
        else:
            await self._send_stream(conn, request, stream, head, chunked, seconds)
        if conn.closed and not conn.received:
            raise _error(httpx.WriteError, "Connection lost while sending the request.", request, True)

    async def _send_stream(
        self,
        conn: _Conn,
        request: httpx.Request,
        stream: AsyncIterable[bytes],
        head: bytes,
        chunked: bool,
        seconds: float | None,
    ) -> None:
        """Stream the upload chunk by chunk, waiting for the socket to drain between chunks."""
        conn.write(head)
        async for chunk in stream:
            if not chunk:
                continue
            if conn.closed:
                break
            if chunked:
                conn.write(b"%x\r\n" % len(chunk))
                conn.write(chunk)
                conn.write(b"\r\n")
            else:
                conn.write(chunk)
            await self._drain(conn, request, seconds)
        if chunked and not conn.closed:
            conn.write(b"0\r\n\r\n")

    @staticmethod
    async def _drain(conn: _Conn, request: httpx.Request, seconds: float | None) -> None:
        """Write back-pressure: wait while the transport's buffer is above its high-water mark."""
        while conn.write_paused and not conn.closed:
            try:
                await conn.wait(seconds)
            except TimeoutError:
                raise _error(
                    httpx.WriteTimeout, "Timed out sending the request body.", request, True
                ) from None

    @staticmethod
    def _encode_head(request: httpx.Request) -> tuple[bytes, bool, bool]:
        """Serialise the request head verbatim; return (head, chunked, has_body)."""
        target = request.extensions.get("target") or request.url.raw_path
        parts = [request.method.encode("ascii"), b" ", target, b" HTTP/1.1\r\n"]
        chunked = False
        length: bytes | None = None
        for name, value in request.headers.raw:
            parts += (name, b": ", value, b"\r\n")
            n = len(name)
            if n == 14 and name.lower() == b"content-length":
                length = value.strip()
            elif n == 17 and name.lower() == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
        parts.append(b"\r\n")
        return b"".join(parts), chunked, chunked or (length is not None and length != b"0")

    async def _acquire(self, pool: _Pool, seconds: float | None, request: httpx.Request) -> _Conn | None:
        """Return an idle connection, or None when the caller got a free slot and must connect."""
        idle = pool.idle
        if idle:
            deadline = asyncio.get_running_loop().time() - self._expiry
            while idle:
                conn = idle.pop()
                if not conn.closed and conn.idle_since >= deadline:
                    return conn
                conn.close()
                pool.total -= 1
        if self._max_connections is None or pool.total < self._max_connections:
            pool.total += 1
            return None
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[_Conn | None] = loop.create_future()
        pool.waiters.append(fut)
        handle = None if seconds is None else loop.call_later(seconds, _expire, fut)
        try:
            return await fut
        except TimeoutError:
            pool.forget()
            raise _error(httpx.PoolTimeout, "Timed out waiting for a connection.", request, False) from None
        except BaseException:
            if not fut.done() or fut.cancelled() or fut.exception() is not None:
                pool.forget()
            elif (got := fut.result()) is None:  # handed a slot just as we were cancelled: pass it on
                self._free_slot(pool)
            else:
                self._release(got)
            raise
        finally:
            if handle is not None:
                handle.cancel()

    async def _connect(self, pool: _Pool, key: _Key, seconds: float | None, request: httpx.Request) -> _Conn:
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
                _, conn = await loop.create_connection(
                    lambda: _Conn(loop, pool), host, port, ssl=ctx, server_hostname=host if ctx else None
                )
        except TimeoutError:
            self._free_slot(pool)
            raise _error(
                httpx.ConnectTimeout, f"Timed out connecting to {host}:{port}.", request, False
            ) from None
        except OSError as exc:
            self._free_slot(pool)
            raise _error(
                httpx.ConnectError, f"Cannot connect to {host}:{port}: {exc}", request, False
            ) from exc
        except BaseException:
            self._free_slot(pool)
            raise
        return conn

    def _release(self, conn: _Conn) -> None:
        """Pool ``conn`` if its response was fully read and it may be reused, else close it."""
        pool = conn.pool
        conn.active = False
        if self._closed or conn.closed or not conn.done or not conn.keep_alive or conn.chunks:
            conn.close()
            self._free_slot(pool)
            return
        if conn.read_paused and conn.transport is not None:
            conn.read_paused = False
            conn.transport.resume_reading()
        conn.reused = True
        fut = pool.next_waiter()
        if fut is not None:
            fut.set_result(conn)
            return
        if self._max_keepalive is not None and len(pool.idle) >= self._max_keepalive:
            if self._max_keepalive <= 0:
                conn.close()
                self._free_slot(pool)
                return
            pool.idle.popleft().close()  # drop the oldest idle connection
            pool.total -= 1
        conn.idle_since = conn.loop.time()
        pool.idle.append(conn)
        deadline = conn.idle_since - self._expiry
        idle = pool.idle
        while idle and (idle[0].closed or idle[0].idle_since < deadline):  # amortised O(1) pruning
            idle.popleft().close()
            pool.total -= 1

    def _free_slot(self, pool: _Pool) -> None:
        """A connection slot became free: hand it to the first live waiter, or give it back."""
        fut = pool.next_waiter()
        if fut is not None:
            fut.set_result(None)
        else:
            pool.total -= 1

    async def aclose(self) -> None:
        self._closed = True
        for pool in self._pools.values():
            while pool.idle:
                pool.idle.pop().close()
            while (fut := pool.next_waiter()) is not None:
                fut.set_exception(RuntimeError("LeanTransport is closed."))
        self._pools.clear()
