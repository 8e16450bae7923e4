"""LeanTransport against tiny asyncio servers on 127.0.0.1 that send exactly the bytes each case needs.

Every test runs on both the default asyncio loop and uvloop, inside ``asyncio.Runner`` with a deadline,
so no pytest-asyncio configuration is needed and nothing can hang.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any

import httpx
import pytest

from lbapp.connection import Connection
from lbapp.connection_pool import ResponseBody
from lbapp.transport import LeanTransport

from .rawbackend import OK, AsyncBackend, Handler, keep_alive, loop_factories, read_request

DEADLINE = 10.0
Backend = AsyncBackend


@pytest.fixture(params=loop_factories())
def run(request: pytest.FixtureRequest) -> Iterator[Callable[[Coroutine[Any, Any, Any]], Any]]:
    """Run a coroutine to completion on the parametrised loop, bounded by DEADLINE seconds."""
    with asyncio.Runner(loop_factory=request.param) as runner:
        yield lambda coro: runner.run(asyncio.wait_for(coro, DEADLINE))


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    """Answer with the raw bytes of the request as the body."""
    while True:
        raw = await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(raw), raw))
        await writer.drain()


def split_ok(finish: asyncio.Event) -> Handler:
    """Like keep_alive(OK), but the last body byte waits for ``finish``: the response stays in flight."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            await read_request(reader)
            writer.write(OK[:-1])
            await finish.wait()
            writer.write(OK[-1:])

    return handler


def req(url: str, method: str = "GET", **kw: Any) -> httpx.Request:
    kw.setdefault("headers", [(b"Host", b"test")])
    return httpx.Request(method, url, **kw)


def timeouts(**kw: float) -> dict[str, Any]:
    return {"timeout": {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 5.0, **kw}}


async def fetch(t: LeanTransport, request: httpx.Request) -> tuple[httpx.Response, bytes]:
    response = await t.handle_async_request(request)
    return response, await response.aread()


# -- request encoding -------------------------------------------------------------------------------
def test_request_line_target_and_headers_are_verbatim(run: Any) -> None:
    async def main() -> None:
        async with Backend(echo) as b:
            t = LeanTransport()
            headers = [(b"Host", b"x"), (b"X-Dup", b"1"), (b"x-dup", b"2"), (b"X-Empty", b"")]
            target = b"/a/%2F/./x//b?q=%2f&r"
            _, body = await fetch(t, req(b.url(), headers=headers, extensions={"target": target}))
            expected = (
                b"GET /a/%2F/./x//b?q=%2f&r HTTP/1.1\r\nHost: x\r\nX-Dup: 1\r\nx-dup: 2\r\nX-Empty: \r\n\r\n"
            )
            assert body == expected
            _, body = await fetch(t, req(b.url("/p%2Fq?x=1")))
            assert body == b"GET /p%2Fq?x=1 HTTP/1.1\r\nHost: test\r\n\r\n"  # url.raw_path, nothing added
            await t.aclose()

    run(main())


def test_content_length_body_is_sent_as_is(run: Any) -> None:
    async def main() -> None:
        async with Backend(echo) as b:
            t = LeanTransport()
            headers = [(b"Host", b"x"), (b"Content-Length", b"5")]
            _, body = await fetch(t, req(b.url(), "POST", headers=headers, content=b"hello"))
            assert body == b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
            await t.aclose()

    run(main())


def test_chunked_upload_is_streamed_and_encoded(run: Any) -> None:
    """The second chunk is only produced after the server saw the first: buffering would deadlock."""

    async def main() -> None:
        first_seen = asyncio.Event()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            raw = await reader.readuntil(b"hello\r\n")
            first_seen.set()
            raw += await reader.readuntil(b"0\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(raw), raw))

        async def body() -> AsyncIterator[bytes]:
            yield b"hello"
            await first_seen.wait()
            yield b""  # empty chunks must not end the chunked body early
            yield b"world!" * 3

        async with Backend(handler) as b:
            t = LeanTransport()
            headers = [(b"Host", b"x"), (b"Transfer-Encoding", b"chunked")]
            _, echoed = await fetch(t, req(b.url(), "PUT", headers=headers, content=body()))
            head = b"PUT / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            assert echoed == head + b"5\r\nhello\r\n12\r\n" + b"world!" * 3 + b"\r\n0\r\n\r\n"
            await t.aclose()

    run(main())


def test_upload_write_backpressure_and_write_timeout(run: Any) -> None:
    """A server that never reads: the upload pauses on the full socket and fails with WriteTimeout."""

    async def main() -> None:
        produced = 0

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            await asyncio.Event().wait()

        async def body() -> AsyncIterator[bytes]:
            nonlocal produced
            chunk = b"x" * (1 << 20)
            for _ in range(512):
                produced += len(chunk)
                yield chunk

        async with Backend(handler) as b:
            t = LeanTransport()
            headers = [(b"Host", b"x"), (b"Content-Length", str(512 << 20).encode())]
            request = req(b.url(), "POST", headers=headers, content=body(), extensions=timeouts(write=0.3))
            with pytest.raises(httpx.WriteTimeout) as info:
                await t.handle_async_request(request)
            assert info.value.request_sent is True  # type: ignore[attr-defined]
            assert produced < 128 << 20  # stopped pulling the stream while the socket was full
            assert t.origin_pool(*b.key()).total == 0
            await t.aclose()

    run(main())


# -- response framing -------------------------------------------------------------------------------
def test_response_headers_raw_in_order_with_duplicates(run: Any) -> None:
    async def main() -> None:
        raw = (
            b"HTTP/1.1 201 Made It\r\nSet-Cookie: a=1\r\nX-A: 1\r\nset-cookie: b=2\r\n"
            b"Content-Length: 3\r\n\r\nabc"
        )
        async with Backend(keep_alive(raw)) as b:
            t = LeanTransport()
            response, body = await fetch(t, req(b.url()))
            assert response.status_code == 201
            assert response.reason_phrase == "Made It"
            assert response.http_version == "HTTP/1.1"
            assert response.headers.raw == [
                (b"Set-Cookie", b"a=1"),
                (b"X-A", b"1"),
                (b"set-cookie", b"b=2"),
                (b"Content-Length", b"3"),
            ]
            assert body == b"abc"
            await t.aclose()

    run(main())


def test_chunked_response_is_decoded_but_never_decompressed(run: Any) -> None:
    async def main() -> None:
        raw = (
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"4\r\nnot \r\n9\r\ngzip data\r\n0\r\n\r\n"
        )
        async with Backend(keep_alive(raw)) as b:
            t = LeanTransport()
            for _ in range(2):
                response = await t.handle_async_request(req(b.url()))
                assert b"".join([c async for c in response.aiter_raw()]) == b"not gzip data"
                await response.aclose()
            assert b.connections == 1
            await t.aclose()

    run(main())


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.0 200 OK\r\nX: y\r\n\r\nuntil close",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil close",
        b"HTTP/1.1 200 OK\r\n\r\nuntil close",
    ],
    ids=["http10", "connection-close", "no-length"],
)
def test_read_until_close_body_and_no_reuse(run: Any, raw: bytes) -> None:
    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            await read_request(reader)
            writer.write(raw)

        async with Backend(handler) as b:
            t = LeanTransport()
            for _ in range(2):
                _, body = await fetch(t, req(b.url()))
                assert body == b"until close"
            assert b.connections == 2
            await t.aclose()

    run(main())


def test_head_204_304_have_no_body_and_keep_the_connection(run: Any) -> None:
    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            while True:
                raw = await read_request(reader)
                if raw.startswith(b"HEAD"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
                elif b"/204" in raw:
                    writer.write(b"HTTP/1.1 204 No Content\r\nX: 1\r\n\r\n")
                elif b"/304" in raw:
                    writer.write(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    writer.write(b"2\r\nok\r\n0\r\n\r\n")

        async with Backend(handler) as b:
            t = LeanTransport()
            for method, path, status in [("HEAD", "/", 200), ("GET", "/204", 204), ("GET", "/304", 304)]:
                response, body = await fetch(t, req(b.url(path), method))
                assert (response.status_code, body) == (status, b"")
                _, body = await fetch(t, req(b.url("/after")))
                assert body == b"ok"
            assert b.connections == 1
            await t.aclose()

    run(main())


def test_interim_100_continue_is_skipped(run: Any) -> None:
    async def main() -> None:
        raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK
        async with Backend(keep_alive(raw)) as b:
            t = LeanTransport()
            for _ in range(2):
                response, body = await fetch(t, req(b.url()))
                assert (response.status_code, body) == (200, b"ok")
                assert response.headers.raw == [(b"Content-Length", b"2")]
            assert b.connections == 1
            await t.aclose()

    run(main())


def test_download_backpressure_keeps_buffer_bounded(run: Any) -> None:
    """1 MiB arrives much faster than the consumer reads: the protocol pauses reading at ~256 KiB."""

    async def main() -> None:
        size = 1 << 20

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            writer.write(b"z" * size)
            await writer.drain()
            await reader.read()  # keep the connection open until the client closes it

        async with Backend(handler) as b:
            t = LeanTransport()
            response = await t.handle_async_request(req(b.url()))
            stream = response.stream
            assert isinstance(stream, ResponseBody) and stream.connection is not None
            conn = stream.connection
            received, peak, paused = 0, 0, False
            async for chunk in response.aiter_raw():
                received += len(chunk)
                peak = max(peak, conn.buffered)
                paused = paused or conn.read_paused
                await asyncio.sleep(0.002)  # the slow consumer
            assert received == size
            assert paused
            assert peak <= 256 * 1024 + 256 * 1024  # high-water mark plus at most one socket read
            assert b.connections == 1 and len(t.origin_pool(*b.key()).idle) == 1
            await t.aclose()

    run(main())


# -- pool -------------------------------------------------------------------------------------------
def test_sequential_requests_reuse_one_connection(run: Any) -> None:
    async def main() -> None:
        async with Backend(keep_alive(OK)) as b:
            t = LeanTransport()
            async with httpx.AsyncClient(transport=t) as client:
                for _ in range(10):
                    response = await client.get(b.url())
                    assert response.text == "ok"
                    request = client.build_request("GET", b.url())
                    response = await client.send(request, stream=True)
                    assert [c async for c in response.aiter_raw()] == [b"ok"]
                    await response.aclose()
            assert b.connections == 1

    run(main())


def test_keepalive_expiry_and_max_keepalive(run: Any) -> None:
    async def main() -> None:
        finish = asyncio.Event()
        finish.set()
        async with Backend(split_ok(finish)) as b:
            t = LeanTransport(max_keepalive=1, keepalive_expiry=4.0)
            await fetch(t, req(b.url()))
            pool = t.origin_pool(*b.key())
            pool.idle[0].idle_since -= 5.0  # pretend it idled past keepalive_expiry
            await fetch(t, req(b.url()))
            assert b.connections == 2
            finish.clear()
            held = [await t.handle_async_request(req(b.url())) for _ in range(3)]
            assert pool.total == 3
            finish.set()
            for response in held:
                await response.aread()
            assert len(pool.idle) == 1 and pool.total == 1
            await t.aclose()

    run(main())


def test_idle_connection_closed_by_server_is_not_reused(run: Any) -> None:
    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            await read_request(reader)
            writer.write(OK)
            await writer.drain()

        async with Backend(handler) as b:
            t = LeanTransport()
            await fetch(t, req(b.url()))
            conn = t.origin_pool(*b.key()).idle[0]
            await b.closed.wait()
            for _ in range(1000):  # the EOF reaches the client protocol within a few loop iterations
                if conn.closed:
                    break
                await asyncio.sleep(0)
            assert conn.closed  # connection_lost marked the idle connection
            _, body = await fetch(t, req(b.url()))
            assert body == b"ok" and b.connections == 2
            await t.aclose()

    run(main())


def test_pool_timeout_and_fifo_handoff(run: Any) -> None:
    async def main() -> None:
        finish = asyncio.Event()
        async with Backend(split_ok(finish)) as b:
            t = LeanTransport(max_connections=1)
            held = await t.handle_async_request(req(b.url()))
            start = time.monotonic()
            with pytest.raises(httpx.PoolTimeout) as info:
                await t.handle_async_request(req(b.url(), extensions=timeouts(pool=0.2)))
            assert time.monotonic() - start >= 0.15  # the configured timeout, not sooner
            assert info.value.request_sent is False  # type: ignore[attr-defined]
            waiters = [asyncio.ensure_future(fetch(t, req(b.url()))) for _ in range(3)]
            await asyncio.sleep(0)
            assert t.origin_pool(*b.key()).waiting == 3
            cancelled = asyncio.ensure_future(fetch(t, req(b.url())))
            await asyncio.sleep(0)
            cancelled.cancel()  # a waiter that gives up must not swallow the hand-off
            finish.set()
            assert await held.aread() == b"ok"
            for waiter in waiters:
                assert (await waiter)[1] == b"ok"
            assert cancelled.cancelled()
            assert b.connections == 1
            await t.aclose()

    run(main())


def test_unread_response_closes_the_socket(run: Any) -> None:
    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            while True:
                await read_request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"a" * 1000)
                await writer.drain()

        async with Backend(handler) as b:
            t = LeanTransport()
            response = await t.handle_async_request(req(b.url()))
            await response.aclose()
            await b.closed.wait()  # the server saw the socket close
            assert t.origin_pool(*b.key()).total == 0
            await t.aclose()

    run(main())


# -- errors and retries -----------------------------------------------------------------------------
def stale_second_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
) -> Awaitable[None]:
    """Connection 1 answers once, then drops the next request unanswered (a stale keep-alive)."""

    async def handler() -> None:
        await read_request(reader)
        writer.write(OK)
        if n == 1:
            await reader.readuntil(b"\r\n\r\n")
            return
        while True:
            await read_request(reader)
            writer.write(OK)

    return handler()


def test_stale_keepalive_get_is_retried_once(run: Any) -> None:
    async def main() -> None:
        async with Backend(stale_second_request) as b:
            t = LeanTransport()
            await fetch(t, req(b.url()))
            _, body = await fetch(t, req(b.url()))
            assert body == b"ok" and b.connections == 2
            await t.aclose()

    run(main())


def test_stale_keepalive_with_body_is_not_retried(run: Any) -> None:
    async def main() -> None:
        async with Backend(stale_second_request) as b:
            t = LeanTransport()
            await fetch(t, req(b.url()))
            headers = [(b"Host", b"x"), (b"Content-Length", b"4")]
            with pytest.raises(httpx.RemoteProtocolError) as info:
                await fetch(t, req(b.url(), "POST", headers=headers, content=b"data"))
            assert str(info.value) == "Server disconnected without sending a response."
            assert info.value.request_sent is True  # type: ignore[attr-defined]
            assert info.value.request.method == "POST"
            assert b.connections == 1 and t.origin_pool(*b.key()).total == 0
            await t.aclose()

    run(main())


def test_fresh_connection_disconnect_is_not_retried(run: Any) -> None:
    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            await reader.readuntil(b"\r\n\r\n")

        async with Backend(handler) as b:
            t = LeanTransport()
            with pytest.raises(httpx.RemoteProtocolError, match="without sending a response") as info:
                await fetch(t, req(b.url()))
            assert info.value.request_sent is True  # type: ignore[attr-defined]
            assert b.connections == 1
            await t.aclose()

    run(main())


def test_connect_error_has_request_sent_false(run: Any) -> None:
    async def main() -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()  # nothing listens there now
        t = LeanTransport()
        with pytest.raises(httpx.ConnectError) as info:
            await t.handle_async_request(req(f"http://127.0.0.1:{port}/"))
        assert info.value.request_sent is False  # type: ignore[attr-defined]
        assert t.origin_pool("http", "127.0.0.1", port).total == 0
        await t.aclose()

    run(main())


def test_connect_timeout(run: Any) -> None:
    """A listener whose accept backlog is full never completes the handshake (Linux drops the SYN)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):
            filler = socket.socket()
            filler.settimeout(0.2)
            fillers.append(filler)
            try:
                filler.connect(("127.0.0.1", port))
            except TimeoutError:
                break
        else:  # pragma: no cover - kernel without SYN dropping
            pytest.skip("could not fill the accept backlog")

        async def main() -> None:
            t = LeanTransport(connect_timeout=0.2)
            start = time.monotonic()
            with pytest.raises(httpx.ConnectTimeout) as info:
                await t.handle_async_request(req(f"http://127.0.0.1:{port}/"))
            assert time.monotonic() - start >= 0.15  # the configured timeout, not sooner
            assert info.value.request_sent is False  # type: ignore[attr-defined]
            assert t.origin_pool("http", "127.0.0.1", port).total == 0
            await t.aclose()

        run(main())
    finally:
        for filler in fillers:
            filler.close()
        server.close()


def test_disconnect_mid_body_raises_from_the_iterator(run: Any) -> None:
    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
            await writer.drain()

        async with Backend(handler) as b:
            t = LeanTransport()
            response = await t.handle_async_request(req(b.url()))
            got = b""
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                async for chunk in response.aiter_raw():
                    got += chunk
            assert got == b"0123456789"
            assert t.origin_pool(*b.key()).total == 0
            await t.aclose()

    run(main())


@pytest.mark.parametrize(
    "raw",
    [b"garbage\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nok"],
    ids=["not-http", "cl-and-te"],
)
def test_malformed_response_is_a_protocol_error(run: Any, raw: bytes) -> None:
    async def main() -> None:
        async with Backend(keep_alive(raw)) as b:
            t = LeanTransport()
            with pytest.raises(httpx.RemoteProtocolError):
                await fetch(t, req(b.url()))
            assert t.origin_pool(*b.key()).total == 0
            await t.aclose()

    run(main())


def test_read_timeout_for_headers_and_body(run: Any) -> None:
    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            raw = await read_request(reader)
            if b"/body" in raw:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
            await asyncio.Event().wait()

        async with Backend(handler) as b:
            t = LeanTransport(read_timeout=0.2)
            for path in ("/head", "/body"):
                start = time.monotonic()
                with pytest.raises(httpx.ReadTimeout) as info:
                    await fetch(t, req(b.url(path)))
                assert time.monotonic() - start >= 0.15  # the configured timeout, not sooner
                assert info.value.request_sent is True  # type: ignore[attr-defined]
            assert t.origin_pool(*b.key()).total == 0
            await t.aclose()
            async with httpx.AsyncClient(transport=LeanTransport(), timeout=httpx.Timeout(5, read=0.2)) as c:
                start = time.monotonic()
                with pytest.raises(httpx.ReadTimeout):  # the client's timeout reaches us as an extension
                    await c.get(b.url("/head"))
                assert time.monotonic() - start >= 0.15  # the configured timeout, not sooner

    run(main())


def test_cancellation_closes_the_connection(run: Any) -> None:
    async def main() -> None:
        got_request = asyncio.Event()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            raw = await read_request(reader)
            if b"/body" in raw:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
            got_request.set()
            assert await reader.read() == b""  # returns once the client closed the socket

        async with Backend(handler) as b:
            t = LeanTransport()
            task = asyncio.ensure_future(fetch(t, req(b.url("/head"))))
            await got_request.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await b.closed.wait()
            assert t.origin_pool(*b.key()).total == 0

            got_request.clear()
            b.closed.clear()
            response = await t.handle_async_request(req(b.url("/body")))
            await got_request.wait()
            reading = asyncio.ensure_future(response.aread())
            await asyncio.sleep(0)
            reading.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reading
            await b.closed.wait()
            assert t.origin_pool(*b.key()).total == 0
            await t.aclose()

    run(main())


def test_https_with_a_private_ca(run: Any, tmp_path: Any) -> None:
    if shutil.which("openssl") is None:  # pragma: no cover
        pytest.skip("openssl CLI not available to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cmd = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"]
    cmd += ["-keyout", str(key), "-out", str(cert), "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"]
    subprocess.run(
        cmd,
        check=True,
        capture_output=True,
        timeout=30,
    )
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def main() -> None:
        server = Backend(keep_alive(OK))
        server.server = await asyncio.start_server(server._serve, "127.0.0.1", 0, ssl=server_ctx)
        server.port = server.server.sockets[0].getsockname()[1]
        t = LeanTransport(ssl_context=ssl.create_default_context(cafile=str(cert)))
        for _ in range(3):
            _, body = await fetch(t, req(f"https://127.0.0.1:{server.port}/"))
            assert body == b"ok"
        assert server.connections == 1
        with pytest.raises(httpx.ConnectError):  # the system CAs do not trust our certificate
            await fetch(LeanTransport(), req(f"https://127.0.0.1:{server.port}/"))
        await t.aclose()
        await server.__aexit__()

    run(main())


def test_aclose_closes_idle_connections(run: Any) -> None:
    async def main() -> None:
        async with Backend(keep_alive(OK)) as b:
            t = LeanTransport()
            await fetch(t, req(b.url()))
            await t.aclose()
            await b.closed.wait()
            with pytest.raises(RuntimeError):
                await t.handle_async_request(req(b.url()))

    run(main())


def test_connection_protocol_is_an_asyncio_protocol() -> None:
    assert issubclass(Connection, asyncio.Protocol)
