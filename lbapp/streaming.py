"""The client side of one exchange: its request body as an upstream stream, and its presence.

`ClientBody` feeds the client's body to the upstream request as the transport asks for it. It
bounds what the client can cost: a gap of more than `timeout` between two pieces raises
`BodyTimeout`, more than `limit` bytes raises `BodyTooLarge` (both abort the upstream request, so
a backend never receives a complete-looking truncated body). `buffer` reads a small body whole
before any backend is chosen (nginx's request buffering): a slow client then never holds a backend
connection, and the body can be sent again. A body is also kept for a replay when the request
carries an `Idempotency-Key`. `Exchange` notices a client that goes away, so the upstream request
is cancelled and its connection released.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx

from .deadlines import Deadlines

Receive = Any

# A body up to this size is kept while it streams when the request carries an Idempotency-Key,
# so that it can be sent again after a failure; a larger one makes the request unsafe to repeat.
REPLAY_LIMIT = 1 << 20


class ClientError(Exception):
    """Reading the client's body failed: the attempt is abandoned, never retried."""


class ClientDisconnected(ClientError):
    """The client went away while we were still reading its body."""


class BodyTimeout(ClientError):
    """The client stopped sending its body for longer than `LB_CLIENT_BODY_TIMEOUT` (408)."""


class BodyTooLarge(ClientError):
    """The client's body grew past `LB_MAX_BODY_SIZE` (413)."""


class ClientBody(httpx.AsyncByteStream):
    """The client's request body, read from ASGI `receive` as the upstream asks for it."""

    __slots__ = ("complete", "exchange", "expired", "kept", "kept_bytes", "limit", "prefix", "read",
                 "receive", "started", "timeout")  # fmt: skip

    def __init__(
        self,
        receive: Receive,
        exchange: Exchange,
        keep: bool = False,
        timeout: float | None = None,
        limit: int = 0,
    ) -> None:
        self.receive = receive
        self.exchange = exchange
        self.timeout = timeout
        self.limit = limit  # 0: no limit
        self.started = False  # an upstream attempt began reading it
        self.expired = False  # the body timeout passed while waiting for a piece
        self.complete = False
        self.read = 0
        self.prefix: list[bytes] = []  # read by `buffer` before any backend was chosen
        # With `keep` (Idempotency-Key), the chunks are kept while they stream, for a replay.
        self.kept: list[bytes] | None = [] if keep else None
        self.kept_bytes = 0

    def _expire(self) -> None:
        """The client sent nothing for `timeout`: stop waiting (the request task is cancelled)."""
        task = self.exchange.task
        if task is not None and not task.done():
            self.expired = True
            task.cancel()

    @property
    def replayable(self) -> bool:
        """The whole body was read and kept: a retry can send it again."""
        return self.complete and self.kept is not None

    async def buffer(self, size: int) -> httpx.ByteStream | None:
        """Read the body whole if it is at most `size` bytes, as a stream that can be sent again;
        None when it is larger (what was read streams first)."""
        while not self.complete:
            chunk = await self._next()
            if chunk:
                self.prefix.append(chunk)
                if self.read > size:
                    return None
        return httpx.ByteStream(b"".join(self.prefix))

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.started:
            if not self.replayable:
                raise httpx.StreamConsumed()
            assert self.kept is not None
            for chunk in self.kept:
                yield chunk
            return
        self.started = True
        for chunk in self.prefix:
            yield chunk
        while not self.complete:
            chunk = await self._next()
            if chunk:
                yield chunk

    async def _next(self) -> bytes:
        """The next piece of the body (maybe empty); bounded in time and in total size."""
        task = self.exchange.task
        if self.timeout is None:
            message = await self.receive()
        elif task is None or task is not asyncio.current_task(self.exchange.loop):
            try:  # read outside the request's own task: a timeout of its own
                async with asyncio.timeout(self.timeout):
                    message = await self.receive()
            except TimeoutError:
                raise BodyTimeout() from None
        else:
            # `asyncio.timeout` would cost a timer handle (and a getpid()) per piece: a shared
            # deadline instead, which cancels the task when it passes.
            deadlines, timeout = self.exchange.deadlines, self.timeout
            deadlines.add(timeout, self, ClientBody._expire)
            try:
                message = await self.receive()
            except asyncio.CancelledError:
                if self.expired:
                    task.uncancel()
                    raise BodyTimeout() from None
                raise
            finally:
                deadlines.discard(timeout, self)
        if message["type"] == "http.disconnect":
            self.exchange.client_gone = True
            raise ClientDisconnected()
        chunk: bytes = message.get("body", b"")
        if chunk:
            self.read += len(chunk)
            if self.limit and self.read > self.limit:
                raise BodyTooLarge()
            if self.kept is not None:
                self.kept_bytes += len(chunk)
                if self.kept_bytes <= REPLAY_LIMIT:
                    self.kept.append(chunk)
                else:
                    self.kept = None  # too big to keep: not replayable
        if not message.get("more_body", False):
            self.complete = True
            self.exchange.watch_disconnect(self.receive)
        return chunk


# Most exchanges end within this; only longer ones pay for a disconnect-watching task.
WATCH_AFTER = 0.1


class Exchange:
    """Per-request bookkeeping: is the client still there, and is the response finished."""

    __slots__ = ("client_gone", "deadlines", "done", "loop", "receive", "task", "watcher")

    def __init__(self, loop: asyncio.AbstractEventLoop | None, deadlines: Deadlines | None) -> None:
        # The loop is passed in (the proxy's, set by the lifespan): on Python 3.11
        # `get_running_loop()` (and `current_task()` without a loop) costs a getpid() system call.
        if loop is None or deadlines is None:  # no lifespan ran: this exchange's own
            loop = asyncio.get_running_loop()
            deadlines = Deadlines(loop)
        self.loop = loop
        self.deadlines = deadlines
        self.client_gone = False
        self.done = False
        self.task = asyncio.current_task(loop)
        self.receive: Receive = None  # set once watching is asked for
        self.watcher: asyncio.Task[None] | None = None

    def watch_disconnect(self, receive: Receive) -> None:
        """Once the body is read, `receive` only returns on disconnect: cancel the request then.

        The watcher starts only if the exchange is still running after `WATCH_AFTER` (a shared
        deadline, deadlines.py): a task per short exchange would cost more than the exchange.
        """
        if self.receive is None and not self.done:
            self.receive = receive
            self.deadlines.add(WATCH_AFTER, self, Exchange._start_watcher)

    def _start_watcher(self) -> None:
        if not self.done:
            self.watcher = self.loop.create_task(self._watch(self.receive))

    async def _watch(self, receive: Receive) -> None:
        message = await receive()
        while message["type"] == "http.request":  # the (empty) body of a request without one
            message = await receive()
        if message["type"] == "http.disconnect" and not self.done and self.task is not None:
            self.client_gone = True
            self.task.cancel()

    def finish(self) -> None:
        self.done = True
        if self.receive is not None and self.watcher is None:
            self.deadlines.discard(WATCH_AFTER, self)
        if self.watcher is not None and not self.watcher.done():
            self.watcher.cancel()
