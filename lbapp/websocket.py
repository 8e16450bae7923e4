"""WebSocket relay: open the backend's WebSocket first, then accept the client, then copy messages.

ASGI gives the app messages, not a socket (uvicorn owns the client's framing), so a raw TCP splice
after the `101` is impossible: lbapp terminates WebSocket on both sides and copies whole messages,
text as text and binary as binary (the backend side is in `wsupstream`).

Order (RFC 6455 through a proxy, as nginx does it): the backend answers the handshake first; only
then is the client accepted, with the subprotocol the backend chose (or none) and the backend's
other response headers (e.g. `Set-Cookie`). A backend that refuses (403, 401 with a body, a 3xx)
reaches the client as that HTTP response through ASGI's WebSocket denial response.

Flow control: one message at a time per direction. The reader of one side awaits the writer of
the other (`websockets` waits for its write buffer to drain; uvicorn's send waits for the client
transport), and both libraries stop reading their socket while an unread message waits, so a slow
reader slows the other side's sender through TCP instead of growing a buffer here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from .wsupstream import WebSocketConfig

logger = logging.getLogger("lbapp.websocket")

Receive = Any
Send = Any

# Codes that report a state and must never be sent in a close frame (RFC 6455 §7.4.1): no status
# received -> normal closure; abnormal closure or TLS failure -> internal error.
WIRE_CODES = {1005: 1000, 1006: 1011, 1015: 1011}
ENDED_BY = ("client", "backend", "idle", "limit", "shutdown", "error")  # the `ended_by` of a session


def wire_code(code: int | None) -> int:
    """A close code fit to send: the reserved status-only codes mapped as RFC 6455 requires."""
    if code is None:
        return 1000
    return WIRE_CODES.get(code, code)


Close = tuple[int, str]  # a close frame to send: code, reason


class Session:
    """One relayed session: two copying tasks (and an idle watchdog), counters, and how it ended."""

    __slots__ = (
        "active_at",
        "bytes_in",
        "bytes_out",
        "close_code",
        "close_reason",
        "config",
        "ended_by",
        "messages_in",
        "messages_out",
        "receive",
        "send",
        "upstream",
    )

    def __init__(self, upstream: ClientConnection, receive: Receive, send: Send, config: WebSocketConfig):
        self.upstream = upstream
        self.receive = receive
        self.send = send
        self.config = config
        self.messages_in = self.messages_out = 0  # in: client -> backend; out: backend -> client
        self.bytes_in = self.bytes_out = 0
        self.active_at = 0.0
        self.ended_by = ""
        self.close_code = 0  # as received from the side that ended it (1005/1006 included)
        self.close_reason = ""

    async def run(self) -> None:
        """Relay until one side closes, then close the other with the same code (mapped)."""
        loop = asyncio.get_running_loop()
        self.active_at = loop.time()
        tasks = [loop.create_task(self._from_client()), loop.create_task(self._from_upstream())]
        if self.config.idle_timeout:
            tasks.append(loop.create_task(self._watch_idle()))
        to_client: Close | None = (1011, "")
        to_upstream: Close | None = (1011, "")
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            first = next(iter(done))
            error = None if first.cancelled() else first.exception()
            if first.cancelled() or error is not None:
                self.ended_by = "error"
                logger.error("WebSocket relay failed; closing both sides with 1011", exc_info=error)
            else:
                to_client, to_upstream = first.result()
        except asyncio.CancelledError:  # the server is stopping (graceful timeout over)
            self.ended_by, self.close_code = "shutdown", 1001
            to_client = to_upstream = (1001, "going away")
            raise
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._close(to_client, to_upstream)

    async def _close(self, to_client: Close | None, to_upstream: Close | None) -> None:
        if to_client is not None:
            with contextlib.suppress(Exception):  # the client may be gone already
                await self.send({"type": "websocket.close", "code": to_client[0], "reason": to_client[1]})
        if to_upstream is not None:
            with contextlib.suppress(Exception):
                await self.upstream.close(*to_upstream)
        self.upstream.transport.abort()  # no-op once closed; frees the socket if the close stalled

    async def _from_client(self) -> tuple[Close | None, Close | None]:
        receive, upstream, limit = self.receive, self.upstream, self.config.max_message
        loop = asyncio.get_running_loop()
        data: str | bytes
        try:
            while True:
                message = await receive()
                if message["type"] == "websocket.receive":
                    text = message.get("text")
                    if text is not None:
                        data = text
                        size = len(text) if text.isascii() else len(text.encode())
                    else:
                        data = message.get("bytes") or b""
                        size = len(data)
                    if size > limit:
                        self.ended_by, self.close_code = "limit", 1009
                        return (1009, "message too big"), (1001, "client sent a message too big")
                    self.messages_in += 1
                    self.bytes_in += size
                    self.active_at = loop.time()
                    await upstream.send(data)
                elif message["type"] == "websocket.disconnect":
                    code = message.get("code", 1005)
                    reason = message.get("reason") or ""
                    self.ended_by, self.close_code, self.close_reason = "client", code, reason
                    return None, (wire_code(code), reason)
        except ConnectionClosed as exc:
            return self._upstream_closed(exc)

    async def _from_upstream(self) -> tuple[Close | None, Close | None]:
        upstream, send = self.upstream, self.send
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await upstream.recv()
                if isinstance(data, str):
                    await send({"type": "websocket.send", "text": data})
                    size = len(data) if data.isascii() else len(data.encode())
                else:
                    await send({"type": "websocket.send", "bytes": data})
                    size = len(data)
                self.messages_out += 1
                self.bytes_out += size
                self.active_at = loop.time()
        except ConnectionClosed as exc:
            return self._upstream_closed(exc)
        except OSError:  # the client went away mid-send; its disconnect follows
            self.ended_by, self.close_code = "client", 1006
            return None, (1011, "")

    def _upstream_closed(self, exc: ConnectionClosed) -> tuple[Close | None, Close | None]:
        """The backend closed (its code goes to the client), or we failed it (the client gets 1011)."""
        self.ended_by = "backend"
        if exc.rcvd is not None and (exc.sent is None or exc.rcvd_then_sent):
            self.close_code, self.close_reason = exc.rcvd.code, exc.rcvd.reason
            return (wire_code(exc.rcvd.code), exc.rcvd.reason), None
        if exc.sent is not None:  # we failed it: too big, keepalive timeout, protocol error
            self.close_code, self.close_reason = exc.sent.code, exc.sent.reason
            return (1011, exc.sent.reason or "backend connection failed"), None
        self.close_code = 1006  # the connection dropped without a close frame
        return (1011, "backend connection lost"), None

    async def _watch_idle(self) -> tuple[Close | None, Close | None]:
        loop = asyncio.get_running_loop()
        timeout = self.config.idle_timeout
        while True:  # one timer per session, re-armed only when it fires: nothing per message
            remaining = self.active_at + timeout - loop.time()
            if remaining <= 0:
                break
            await asyncio.sleep(remaining)
        self.ended_by, self.close_code, self.close_reason = "idle", 1001, "idle timeout"
        return (1001, "idle timeout"), (1001, "idle timeout")
