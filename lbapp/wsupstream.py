"""The backend side of a WebSocket session: connect, send the client's handshake, read the answer.

A `websockets` client connection, opened here by hand rather than through `websockets.connect()`,
which would follow redirects and add its own `Host` and `User-Agent`: a proxy passes the client's
headers (minus hop-by-hop and the handshake's own, plus forwarding headers) and the backend's
answer as they are. Compression is not negotiated upstream: the backend is usually one hop away
on a fast network, where deflate costs CPU for nothing (uvicorn negotiates it with the client).
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection
from websockets.client import ClientProtocol
from websockets.datastructures import Headers
from websockets.http11 import Request
from websockets.typing import Subprotocol
from websockets.uri import WebSocketURI

from .headers import filter_response_headers
from .settings import Settings

Scope = dict[str, Any]
Send = Any

# The handshake's own headers: each side's WebSocket library makes its own (keys, version,
# extensions are per connection); the subprotocol list goes through the library.
HANDSHAKE_HEADERS = frozenset(
    {
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-protocol",
        b"sec-websocket-accept",
    }
)
NOT_FORWARDED = HANDSHAKE_HEADERS | {b"content-length", b"transfer-encoding"}


def forward_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """The client's filtered header list (see `headers.parse_request_headers`) for the handshake.

    Without the handshake's own headers, and without body framing: a handshake has no body.
    """
    return [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in headers
        if name not in NOT_FORWARDED
    ]


@dataclass(slots=True, frozen=True)
class WebSocketConfig:
    """The relay's limits (from `LB_WEBSOCKET_*` and the upstream timeouts)."""

    max_message: int = 16 * 1024 * 1024
    idle_timeout: float = 0.0  # 0: sessions may stay idle forever
    ping_interval: float = 20.0  # keepalive pings to the backend; 0: none
    connect_timeout: float = 2.0
    handshake_timeout: float = 10.0
    close_timeout: float = 5.0
    max_queue: int = 16  # frames a backend may send ahead of a slow client (then TCP pushes back)

    @classmethod
    def from_settings(cls, settings: Settings) -> WebSocketConfig:
        return cls(
            max_message=settings.websocket_max_message,
            idle_timeout=settings.websocket_idle_timeout,
            ping_interval=settings.websocket_ping_interval,
            connect_timeout=settings.connect_timeout,
            handshake_timeout=settings.upstream_timeout,
        )


class Unreachable(Exception):
    """The TCP (or TLS) connection to the backend could not be made: nothing was sent."""


class UpstreamProtocol(ClientProtocol):
    """A client protocol whose handshake request carries the client's headers, not the library's."""

    def __init__(self, uri: WebSocketURI, headers: list[tuple[str, str]], **options: Any) -> None:
        super().__init__(uri, **options)
        self.forward = headers

    def connect(self) -> Request:
        request = super().connect()
        own = request.headers  # Host, Upgrade, Connection, Sec-WebSocket-Key/-Version/-Protocol
        headers = Headers()
        if not any(name == "host" for name, _ in self.forward):
            headers["Host"] = own["Host"]
        for name, value in self.forward:
            headers[name] = value
        for name, value in own.raw_items():
            if name != "Host":
                headers[name] = value
        request.headers = headers
        return request


async def open_upstream(
    url: str, target: str, headers: list[tuple[str, str]], subprotocols: list[str], config: WebSocketConfig
) -> ClientConnection:
    """Connect to `url` (http/https/ws/wss) and perform the opening handshake for `target`.

    Raises `Unreachable` (connect phase), `TimeoutError` (no handshake answer in time),
    `websockets.exceptions.InvalidStatus` (the backend refused: `.response` is its answer) or
    another `InvalidHandshake`/`OSError`/`EOFError` (a broken answer).
    """
    parts = urlsplit(url)
    secure = parts.scheme in ("https", "wss")
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if secure else 80)
    uri = WebSocketURI(secure, host, port, target, "")
    protocol = UpstreamProtocol(
        uri,
        headers,
        subprotocols=[Subprotocol(p) for p in subprotocols] or None,
        max_size=config.max_message,
    )
    connection = ClientConnection(
        protocol,
        ping_interval=config.ping_interval or None,
        ping_timeout=config.ping_interval or None,
        close_timeout=config.close_timeout,
        max_queue=config.max_queue,
    )
    loop = asyncio.get_running_loop()
    context = ssl.create_default_context() if secure else None
    try:
        async with asyncio.timeout(config.connect_timeout):
            await loop.create_connection(lambda: connection, host, port, ssl=context)
    except (OSError, TimeoutError) as exc:
        raise Unreachable(f"{type(exc).__name__}: {exc}") from exc
    try:
        async with asyncio.timeout(config.handshake_timeout):
            await connection.handshake(None, None)
    except BaseException:
        connection.transport.abort()
        raise
    if config.ping_interval:
        connection.start_keepalive()
    return connection


def accept_message(upstream: ClientConnection, extra: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """`websocket.accept` with the backend's subprotocol (never an invented or empty one) and headers."""
    response = upstream.response
    assert response is not None  # the handshake succeeded
    raw = [
        (k.encode("latin-1"), k.lower().encode("latin-1"), v.encode("latin-1"))
        for k, v in response.headers.raw_items()
    ]
    headers, _ = filter_response_headers(raw, 101)
    headers = [(n, v) for n, v in headers if n not in HANDSHAKE_HEADERS]
    message: dict[str, Any] = {"type": "websocket.accept", "headers": headers + extra}
    if upstream.subprotocol:
        message["subprotocol"] = upstream.subprotocol
    return message


async def deny(
    scope: Scope, send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    """Answer the handshake with an HTTP response (ASGI's WebSocket denial response).

    A server without the extension can only refuse: `websocket.close` before accepting is a 403.
    """
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008})
        return
    headers = [(n, v) for n, v in headers if n != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": body})


def refusal(response: Any) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The backend's non-101 answer to the handshake, as status, forwardable headers and body."""
    raw = [
        (k.encode("latin-1"), k.lower().encode("latin-1"), v.encode("latin-1"))
        for k, v in response.headers.raw_items()
    ]
    headers, _ = filter_response_headers(raw, response.status_code)
    return response.status_code, headers, bytes(response.body or b"")
