"""Sending a request body on one connection of `LeanTransport`.

An in-memory body (`httpx.ByteStream`: a buffered client body, or any `content=`) goes out with the
head in one write; a streamed one chunk by chunk, waiting while the socket's write buffer is above
its high-water mark (upload back-pressure), bounded by the write timeout. Chunked framing is added
here when the head says so. Errors are httpx's, marked `request_sent` (connection.transport_error).
"""

from __future__ import annotations

from collections.abc import AsyncIterable

import httpx

from .connection import Connection, transport_error


async def send_body(
    conn: Connection,
    request: httpx.Request | None,
    stream: AsyncIterable[bytes],
    head: bytes,
    chunked: bool,
    seconds: float | None,
) -> None:
    """Send `head` and the body from `stream`; raise if the connection was lost unanswered."""
    if isinstance(stream, httpx.ByteStream):  # in-memory: coalesce into one write
        parts = [head]
        async for chunk in stream:
            if chunk:
                parts.append(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
        if chunked:
            parts.append(b"0\r\n\r\n")
        conn.write(b"".join(parts))
        await drain(conn, request, seconds)
    else:
        await send_stream(conn, request, stream, head, chunked, seconds)
    if conn.closed and not conn.received:
        raise transport_error(httpx.WriteError, "Connection lost while sending the request.", request, True)


async def send_stream(
    conn: Connection,
    request: httpx.Request | None,
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
        # One write per chunk (each write is a system call): chunked framing costs a copy instead.
        conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
        await drain(conn, request, seconds)
    if chunked and not conn.closed:
        conn.write(b"0\r\n\r\n")


async def drain(conn: Connection, request: httpx.Request | None, seconds: float | None) -> None:
    """Write back-pressure: wait while the transport's buffer is above its high-water mark."""
    while conn.write_paused and not conn.closed:
        try:
            await conn.wait(seconds)
        except TimeoutError:
            raise transport_error(
                httpx.WriteTimeout, "Timed out sending the request body.", request, True
            ) from None
