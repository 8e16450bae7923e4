"""The connections of one origin, and the response body stream that gives a connection back.

As in httpcore, the pool and the body stream live together: a connection returns to the pool when
its response body is exhausted or closed, and only the pool decides whether it is reused. Idle
connections are a LIFO deque and waiters a FIFO deque, so acquiring and releasing a connection is
O(1) (amortised: abandoned waiters and expired idle connections are skipped lazily). A connection
is reused only if its response was complete, framed for keep-alive, and nothing followed it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator

import httpx

from .connection import Connection, expire, transport_error

__all__ = ["LeanResponse", "OriginPool", "ResponseBody"]


class OriginPool:
    """Connections of one origin; ``total`` counts live + connecting connections (the slots in use)."""

    __slots__ = ("closed", "dead", "expiry", "idle", "max_connections", "max_keepalive", "total", "waiters")

    def __init__(
        self, max_connections: int | None, max_keepalive: int | None, keepalive_expiry: float
    ) -> None:
        self.max_connections = max_connections
        self.max_keepalive = max_keepalive
        self.expiry = keepalive_expiry
        self.idle: deque[Connection] = deque()
        self.waiters: deque[asyncio.Future[Connection | None]] = deque()
        self.dead = 0  # waiters that timed out or were cancelled but are still queued
        self.total = 0
        self.closed = False

    async def acquire(self, seconds: float | None, request: httpx.Request | None) -> Connection | None:
        """Return an idle connection, or None when the caller got a free slot and must connect."""
        idle = self.idle
        if idle:
            deadline = idle[-1].loop.time() - self.expiry  # not get_running_loop(): a getpid() each
            while idle:
                conn = idle.pop()
                if not conn.closed and conn.idle_since >= deadline:
                    return conn
                conn.close()
                self.total -= 1
        if self.max_connections is None or self.total < self.max_connections:
            self.total += 1
            return None
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Connection | None] = loop.create_future()
        self.waiters.append(fut)
        handle = None if seconds is None else loop.call_later(seconds, expire, fut)
        try:
            return await fut
        except TimeoutError:
            self._forget()
            raise transport_error(
                httpx.PoolTimeout, "Timed out waiting for a connection.", request, False
            ) from None
        except BaseException:
            if not fut.done() or fut.cancelled() or fut.exception() is not None:
                self._forget()
            elif (got := fut.result()) is None:  # handed a slot just as we were cancelled: pass it on
                self.free_slot()
            else:
                self.release(got)
            raise
        finally:
            if handle is not None:
                handle.cancel()

    def release(self, conn: Connection) -> None:
        """Pool ``conn`` if its response was fully read and it may be reused, else close it."""
        conn.active = False
        if self.closed or conn.closed or not conn.done or not conn.keep_alive or conn.chunks:
            conn.close()
            self.free_slot()
            return
        if conn.read_paused and conn.transport is not None:
            conn.read_paused = False
            conn.transport.resume_reading()
        conn.reused = True
        fut = self._next_waiter()
        if fut is not None:
            fut.set_result(conn)
            return
        idle = self.idle
        if self.max_keepalive is not None and len(idle) >= self.max_keepalive:
            if self.max_keepalive <= 0:
                conn.close()
                self.free_slot()
                return
            idle.popleft().close()  # drop the oldest idle connection
            self.total -= 1
        conn.idle_since = conn.loop.time()
        idle.append(conn)
        deadline = conn.idle_since - self.expiry
        while idle and (idle[0].closed or idle[0].idle_since < deadline):  # amortised O(1) pruning
            idle.popleft().close()
            self.total -= 1

    def free_slot(self) -> None:
        """A connection slot became free: hand it to the first live waiter, or give it back."""
        fut = self._next_waiter()
        if fut is not None:
            fut.set_result(None)
        else:
            self.total -= 1

    def close(self) -> None:
        """Close the idle connections and fail the waiters; busy ones close when released."""
        self.closed = True
        while self.idle:
            self.idle.pop().close()
            self.total -= 1
        while (fut := self._next_waiter()) is not None:
            fut.set_exception(RuntimeError("LeanTransport is closed."))

    @property
    def waiting(self) -> int:
        """Requests queued for a connection slot (abandoned ones not counted)."""
        return sum(not fut.done() for fut in self.waiters)

    def _next_waiter(self) -> asyncio.Future[Connection | None] | None:
        """Pop the first waiter still waiting (FIFO), skipping abandoned ones."""
        waiters = self.waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                return fut
            self.dead -= 1
        return None

    def _forget(self) -> None:
        """A queued waiter gave up: compact the queue once most of it is dead (amortised O(1))."""
        self.dead += 1
        if self.dead * 2 > len(self.waiters):
            self.waiters = deque(fut for fut in self.waiters if not fut.done())
            self.dead = 0


class ResponseBody(httpx.AsyncByteStream):
    """Response body: yields chunks as received and gives the connection back to its pool when done."""

    __slots__ = ("_chunks", "_conn", "_pool", "_request", "_timeout")

    def __init__(
        self,
        pool: OriginPool,
        conn: Connection | None,
        chunks: deque[bytes],
        request: httpx.Request | None,
        seconds: float | None,
    ) -> None:
        self._pool = pool
        self._conn = conn  # None once released: only ``_chunks`` (already received) remain
        self._chunks = chunks
        self._request = request
        self._timeout = seconds

    @property
    def connection(self) -> Connection | None:
        """The connection still being read, or None once it went back to the pool."""
        return self._conn

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
                    raise transport_error(httpx.ReadError, "Connection closed.", self._request, True)
                try:
                    await conn.wait(self._timeout)
                except TimeoutError:
                    raise transport_error(
                        httpx.ReadTimeout, "Timed out reading the response body.", self._request, True
                    ) from None
        except BaseException:
            self._release()  # errors and cancellation: close now, never reuse
            raise

    def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool.release(conn)

    async def aclose(self) -> None:
        self._chunks.clear()
        self._release()


class LeanResponse:
    """A response head and its body stream, without an `httpx.Response` around them.

    `headers` are (raw name, lower-case name, value) triples, as parsed; `aclose` gives the
    connection back (or closes it) like `httpx.Response.aclose`.
    """

    __slots__ = ("headers", "http_version", "reason", "status_code", "stream")

    def __init__(
        self,
        status_code: int,
        headers: list[tuple[bytes, bytes, bytes]],
        stream: ResponseBody,
        http_version: bytes,
        reason: bytes,
    ) -> None:
        self.status_code = status_code
        self.headers = headers
        self.stream = stream
        self.http_version = http_version
        self.reason = reason

    async def aclose(self) -> None:
        await self.stream.aclose()
