"""lbapp's own answers: short JSON bodies for the errors it produces itself, as ASGI messages.

Built once at import (they never change), so answering an error costs two `send` calls. Every
4xx/5xx that lbapp itself produces (rather than a backend) comes from here.
"""

from __future__ import annotations

from typing import Any

Message = dict[str, Any]
Answer = tuple[Message, Message]
Send = Any


def json_error(status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> Answer:
    """A complete ASGI answer: `{"error": message}`, and `Retry-After: 1` on a 503."""
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


async def send_answer(send: Send, answer: Answer) -> int:
    """Send one of the answers above; its status."""
    start, body = answer
    await send(start)
    await send(body)
    status: int = start["status"]
    return status
