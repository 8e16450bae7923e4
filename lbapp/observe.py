"""What the proxy reports about one exchange: bytes, time to headers, the request id, the log line.

`Tap` holds what one request reports: body bytes both ways, when the response headers went out,
the request id. Its `receive` counts the body read; its `send` (for lbapp's own answers) counts
what goes out and adds `X-Request-ID`. The proxy relays a backend's response straight to
`downstream`, the server's `send`, and does the same accounting itself (`proxy.relay`): a wrapper
there would cost a coroutine per message. The proxy hands the tap to `Stats.end` and
`AccessLog.write` when the request is over.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol, cast

from .backend import Backend
from .logs import AccessEntry, BatchingHandler, RequestEntry, find_batching_handler
from .requestid import HEADER, ensure_request_id


class Tap:
    __slots__ = ("_receive", "bytes_in", "bytes_out", "downstream", "headers_at", "rate_limit", "request_id")

    def __init__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.request_id = ensure_request_id(scope)
        self._receive = receive
        self.downstream = send
        self.bytes_in = 0
        self.bytes_out = 0
        self.headers_at = 0.0  # perf_counter() when the response headers were sent, 0 before
        self.rate_limit: str | None = None  # pass, limited or error; None: the route has no limit

    async def receive(self) -> Any:
        message = await self._receive()
        body = message.get("body")
        if body:
            self.bytes_in += len(body)
        return message

    async def send(self, message: Any) -> None:
        if message["type"] == "http.response.start":
            headers = [(n, v) for n, v in message.get("headers", ()) if n.lower() != HEADER]
            headers.append((HEADER, self.request_id))
            message = {**message, "headers": headers}
            await self.downstream(message)
            self.headers_at = time.perf_counter()
            return
        body = message.get("body")
        await self.downstream(message)
        if body:
            self.bytes_out += len(body)


class AccessLog:
    """One line per proxied request, formatted (text or JSON) by the log writer thread, not here.

    The writer is the batching handler the entry point installed on the `lbapp` logger
    (logs.configure_logging), found once at start; without it lines go through `logging`.
    """

    def __init__(self) -> None:
        self.logger = logging.getLogger("lbapp.access")
        self.handler: BatchingHandler | None = None

    def start(self) -> None:
        self.handler = find_batching_handler()

    def write(
        self,
        scope: dict[str, Any],
        tap: Tap,
        status: int,
        backend: Backend | None,
        attempts: int,
        started: float,
    ) -> None:
        if self.logger.disabled:
            return
        client = scope.get("client")
        entry = RequestEntry(
            (
                tap.request_id,
                client[0] if client else None,
                scope["method"],
                scope.get("raw_path") or scope["path"],
                status,
                backend.url if backend is not None else None,
                attempts,
                tap.headers_at - started if tap.headers_at else None,
                time.perf_counter() - started,
                tap.bytes_in,
                tap.bytes_out,
                tap.rate_limit,
            )
        )
        if self.handler is not None:
            self.handler.handle(cast(logging.LogRecord, entry))
        elif self.logger.isEnabledFor(logging.INFO):
            self.logger.info("access", extra={"access": entry.access})

    def write_websocket(
        self,
        scope: dict[str, Any],
        request_id: bytes,
        status: int,
        backend: Backend | None,
        attempts: int,
        started: float,
        answered_at: float,
        session: Relayed | None,
    ) -> None:
        """One line per WebSocket request, written when the session closes (or at once when the
        handshake was refused or failed): `upstream` is the handshake, `total` the whole session,
        in/out the message bytes each way, plus the close code, who ended it and message counts."""
        if self.logger.disabled:
            return
        client = scope.get("client")
        fields: dict[str, Any] = {
            "request_id": request_id.decode("latin-1"),
            "client": client[0] if client else None,
            "method": "GET",
            "path": scope.get("raw_path", b"").decode("latin-1") or scope["path"],
            "status": status,
            "backend": backend.url if backend is not None else None,
            "attempts": attempts,
            "upstream_ms": round((answered_at - started) * 1000, 3),
            "total_ms": round((time.perf_counter() - started) * 1000, 3),
            "bytes_in": session.bytes_in if session is not None else 0,
            "bytes_out": session.bytes_out if session is not None else 0,
        }
        if session is not None:
            fields["ws_close_code"] = session.close_code
            fields["ws_ended_by"] = session.ended_by
            fields["ws_messages_in"] = session.messages_in
            fields["ws_messages_out"] = session.messages_out
        self.emit(fields)

    def emit(self, fields: dict[str, Any]) -> None:
        if self.handler is not None:
            self.handler.handle(cast(logging.LogRecord, AccessEntry(fields)))
        elif self.logger.isEnabledFor(logging.INFO):
            self.logger.info("access", extra={"access": fields})


class Relayed(Protocol):
    """What the access log reads of a closed WebSocket session (see `websocket.Session`)."""

    bytes_in: int
    bytes_out: int
    messages_in: int
    messages_out: int
    close_code: int
    ended_by: str
