"""The launcher's response cycle (lbapp/cycle.py): head and first body part in one write, a held
head flushed when the body is slow, and uvicorn's framing and header rules kept.

In-process uvicorn servers with `http=CoalescingProtocol`; raw sockets read the bytes on the wire.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import pytest

from lbapp.cycle import CoalescingProtocol

from .conftest import ThreadedServer


def exchange(port: int, request: bytes, until: bytes = b"", timeout: float = 10.0) -> bytes:
    """Send `request` and read until `until` was received (or the server closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while not (until and until in data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


async def small(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/chunked":  # no Content-Length: uvicorn's chunked framing
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ab", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    if path == "/bad-value":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-a", b"1\r\nx-b: 2")]})
        return
    if path == "/bad-name":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-b: 2\r\nx-a", b"1")]})
        return
    if path == "/bad-control":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-a", b"1\x00x-b: 2")]})
        return
    if path == "/close":
        headers = [(b"content-length", b"2"), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def test_small_responses_keep_their_framing_on_a_keep_alive_connection() -> None:
    with ThreadedServer(small, http=CoalescingProtocol) as server:
        requests = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        two = exchange(server.port, requests)  # pipelined, read until the server closes
        assert two == (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
        )
        head = exchange(server.port, b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert head == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n"
        chunked = exchange(server.port, b"GET /chunked HTTP/1.1\r\nHost: x\r\n\r\n", until=b"0\r\n\r\n")
        assert chunked.endswith(b"transfer-encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n")
        closed = exchange(server.port, b"GET /close HTTP/1.1\r\nHost: x\r\n\r\n")  # reads until EOF
        assert closed == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"


@pytest.mark.parametrize("path", ["/bad-value", "/bad-name", "/bad-control"])
def test_an_invalid_header_is_never_written(path: str) -> None:
    """uvicorn's rules: a name with separators or controls, a value with CR/LF or another control
    character is refused; the connection closes and nothing of it leaks."""
    with ThreadedServer(small, http=CoalescingProtocol) as server:
        data = exchange(server.port, b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
        assert b"x-b" not in data and b"x-a" not in data


def test_a_held_head_goes_out_before_a_slow_body() -> None:
    """The head is not held back until the body comes: a streaming client sees it at once."""
    release = threading.Event()

    async def slow(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]})
        # The body waits for the test to have seen the head (a thread's event: polled, bounded).
        for _ in range(1000):
            if release.is_set():
                break
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b"late"})

    with ThreadedServer(slow, http=CoalescingProtocol) as server:
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = sock.recv(65536)
                    assert chunk, "closed before the head"
                    head += chunk
                assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
                release.set()
                assert sock.recv(65536) == b"late"
        finally:
            release.set()


@pytest.mark.parametrize("size", [10, 200_000])
def test_bodies_of_any_size_follow_their_head(size: int) -> None:
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)

    async def sized(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % size)]}
        )
        await send({"type": "http.response.body", "body": body})

    with ThreadedServer(sized, http=CoalescingProtocol) as server:
        data = exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, received = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and received == body


def test_keep_alive_timeout_counts_from_the_last_response() -> None:
    """The lazy keep-alive timer: a connection used again before its timeout stays open past the
    first deadline, and closes once idle for the timeout."""
    server = ThreadedServer(small, http=CoalescingProtocol, timeout_keep_alive=1.0)
    with server, socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
        for _ in range(3):  # 3 requests 0.4 s apart: 0.8 s after the first response
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while len(data) < len(answer):
                chunk = sock.recv(65536)
                assert chunk, "closed while in use"
                data += chunk
            assert data == answer
            time.sleep(0.4)  # idle on purpose: less than the timeout
        assert sock.recv(65536) == b""  # then idle past the timeout: closed by the server


async def echo_body(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers with the request body it received, and how many `receive` calls it took."""
    if scope["type"] != "http":
        return
    body, calls, more = b"", 0, True
    while more:
        message = await receive()
        calls += 1
        body += message.get("body", b"")
        more = message.get("more_body", False)
    headers = [(b"content-length", b"%d" % len(body)), (b"x-receives", b"%d" % calls)]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@pytest.mark.parametrize("chunked", [False, True])
def test_a_request_body_in_many_pieces_reaches_the_app_intact(chunked: bool) -> None:
    """The body's pieces are handed over as the parser gave them (joined when several are
    waiting): every byte arrives once, in order, with either framing."""
    body = bytes(range(256)) * 1200  # 300 KiB, past uvicorn's 64 KiB high-water mark
    if chunked:
        framed = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in (body[:1000], body[1000:]))
        framed += b"0\r\n\r\n"
        head = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    else:
        framed = body
        head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    server = ThreadedServer(echo_body, http=CoalescingProtocol)
    with server, socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head)
        for start in range(0, len(framed), 7000):  # many small sends
            sock.sendall(framed[start : start + 7000])
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    response_head, _, received = data.partition(b"\r\n\r\n")
    assert response_head.startswith(b"HTTP/1.1 200 OK") and received == body
