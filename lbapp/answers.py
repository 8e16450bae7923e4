"""lbapp's own answers: short JSON bodies for the errors it produces itself, as ASGI messages.

Built once at import (they never change), so answering an error costs two `send` calls. Every
4xx/5xx that lbapp itself produces (rather than a backend) comes from here, with a `Date` (RFC 9110
§6.6.1: an origin of a response with a clock sends one), formatted once per second.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from typing import Any

Message = dict[str, Any]
Answer = tuple[Message, Message]
Send = Any


_date: tuple[int, bytes] = (0, b"")


def http_date() -> bytes:
    """The current time as an HTTP date (`Thu, 03 Dec 2026 10:00:00 GMT`), cached per second."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, formatdate(now, usegmt=True).encode("ascii"))
    return _date[1]


def json_error(status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> Answer:
    """A complete ASGI answer: `{"error": message}`, and `Retry-After: 1` on a 503.

    The answers below that end the connection (`Connection: close`) do so because the client's
    request stream can no longer be trusted to be in step (an unread or oversized body).
    """
    body = b'{"error": "%s"}' % message.encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 503:
        head.append((b"retry-after", b"1"))
    head += headers or []
    return (
        {"type": "http.response.start", "status": status, "headers": head},
        {"type": "http.response.body", "body": body, "more_body": False},
    )


BAD_GATEWAY = json_error(502, "bad gateway")
ALL_DOWN = json_error(503, "all backends are down")
AT_CAPACITY = json_error(503, "all backends are at capacity")
GATEWAY_TIMEOUT = json_error(504, "gateway timeout")
UPSTREAM_ERRORS = {502: BAD_GATEWAY, 503: ALL_DOWN, 504: GATEWAY_TIMEOUT}
OVERLOADED = json_error(503, "too many requests in flight")
CLOSE = [(b"connection", b"close")]
BAD_REQUEST = json_error(400, "bad request", CLOSE)
BAD_HOST = json_error(400, "missing, duplicate or invalid Host", CLOSE)
BAD_PATH = json_error(400, "the path climbs above the root", CLOSE)
TRACE_NOT_ALLOWED = json_error(
    405, "method not allowed", [(b"allow", b"GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS")]
)
BODY_TIMEOUT = json_error(408, "request body timeout", CLOSE)
TOO_LARGE = json_error(413, "request body too large", CLOSE)


async def send_answer(send: Send, answer: Answer) -> int:
    """Send one of the answers above, dated; its status."""
    start, body = answer
    status: int = start["status"]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*start["headers"], (b"date", http_date())],
        }
    )
    await send(body)
    return status
