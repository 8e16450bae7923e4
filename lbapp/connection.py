"""One HTTP/1.1 connection of `LeanTransport`: an asyncio protocol fed by httptools, and nothing else.

The protocol callbacks fill per-response state (status, headers, body chunks) and wake the one
coroutine waiting on the connection; body bytes are buffered up to a high-water mark, then the
socket stops being read until the consumer drains them (download back-pressure).

Response framing is strict, because a backend's bytes are untrusted: parsing stops at the end of
the final response, and any byte after it (in the same read, or later, while the connection is
idle) closes the connection instead of being parsed into this response or the next one. The one
exception is llhttp's: bare CR/LF right after a response in the same read are skipped (RFC 9112
§2.2 robustness) and parsed into nothing. A status outside 100-599 is a protocol error. The pool
(connection_pool.py) decides reuse from what this module reports (done, keep_alive, closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from typing import Any, cast

import httptools
import httpx

from .deadlines import Deadlines

HIGH_WATER = 256 * 1024  # pause reading above this many unconsumed body bytes ...
LOW_WATER = 64 * 1024  # ... and resume once the consumer drained below this
DISCONNECTED = "Server disconnected without sending a response."


def transport_error(
    cls: type[httpx.TransportError], msg: str, request: httpx.Request | None, sent: bool
) -> Exception:
    """Build an httpx exception that tells the caller whether any request byte hit the wire."""
    exc = cls(msg, request=request)
    exc.request_sent = sent  # type: ignore[attr-defined]  # documented extra attribute
    return exc


def expire(fut: asyncio.Future[Any]) -> None:
    """Timer callback: fail a still-pending future with TimeoutError."""
    if not fut.done():
        fut.set_exception(TimeoutError())


class ProtocolViolation(Exception):
    """Raised inside a parser callback to stop parsing; its message becomes the transport error's."""


class Connection(asyncio.Protocol):
    """One TCP connection; the protocol callbacks fill per-response state that the awaiting side reads."""

    def __init__(self, loop: asyncio.AbstractEventLoop, deadlines: Deadlines) -> None:
        self.loop = loop
        self.deadlines = deadlines  # the transport's shared timer for `wait`
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
        self.accepting = True  # response bytes are expected: active, not done, no error
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
        parser = self.parser
        if not self.accepting or parser is None:  # idle, or after the end of the response
            self._fail(httpx.RemoteProtocolError, "Received data after the end of the response.")
            return
        self.received = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(httpx.RemoteProtocolError, "Protocol upgrades (101) are not supported.")
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            msg = str(cause) if isinstance(cause, ProtocolViolation) else f"Malformed response: {exc}"
            self._fail(httpx.RemoteProtocolError, msg)
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
            msg = "Server disconnected in the middle of the response head." if self.received else DISCONNECTED
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
        if self.done:  # bytes after the final response: never parse them into it or the next one
            raise ProtocolViolation("Received data after the end of the response.")
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
        if status < 200 or status > 599:
            if 100 <= status < 200:
                return  # interim 1xx: keep reading for the final response
            raise ProtocolViolation(f"Invalid status code {status} in the response.")
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
        if self.done:  # HEAD: llhttp does not know there is no body; these bytes are trailing
            raise ProtocolViolation("Received a body after a response that has none.")
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
        if self.buffered > HIGH_WATER and not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()
        self._wake()

    def pop(self) -> bytes:
        data = self.chunks.popleft()
        self.buffered -= len(data)
        if self.read_paused and self.buffered < LOW_WATER and not self.closed and self.transport is not None:
            self.read_paused = False
            self.transport.resume_reading()
        return data

    def _finish(self) -> None:
        self.done = True
        self.accepting = False
        self._wake()

    def _fail(self, cls: type[httpx.TransportError], msg: str) -> None:
        if self.error is None and not self.done:
            self.error = (cls, msg)
        self.accepting = self.keep_alive = False
        self.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, seconds: float | None) -> None:
        """Sleep until a protocol callback wakes us; raise TimeoutError after ``seconds``."""
        fut = self.waiter = self.loop.create_future()
        if seconds is not None:
            self.deadlines.add(seconds, fut, expire)
        try:
            await fut
        finally:
            self.waiter = None
            if seconds is not None:
                self.deadlines.discard(seconds, fut)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.sent = True
        self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()  # never let unread or unsent data linger

    def raise_error(self, request: httpx.Request | None) -> None:
        if self.error is not None:
            cls, msg = self.error
            raise transport_error(cls, msg, request, self.sent)
