"""The upstream HTTP/1.1 parser (connection.py) against raw asyncio servers that misbehave on purpose.

A backend's bytes are untrusted: nothing after the end of a response may be parsed into it or into
the next response, a connection that carried such bytes is closed instead of reused, a bad status
is a protocol error, and a stale keep-alive connection never makes the transport send a request
twice unless that is safe. Every test runs on the asyncio loop and on uvloop, with a deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import httpx
import pytest

from lbapp.connection import Connection
from lbapp.connection_pool import ResponseBody
from lbapp.transport import LeanTransport

from .rawbackend import OK, AsyncBackend, Handler, keep_alive, loop_factories, read_request

DEADLINE = 10.0
INJECTED = b"HTTP/1.1 200 OK\r\nSet-Cookie: sid=attacker\r\nContent-Length: 5\r\n\r\n"


@pytest.fixture(params=loop_factories())
def run(request: pytest.FixtureRequest) -> Iterator[Callable[[Coroutine[Any, Any, Any]], Any]]:
    with asyncio.Runner(loop_factory=request.param) as runner:
        yield lambda coro: runner.run(asyncio.wait_for(coro, DEADLINE))


def req(url: str, method: str = "GET", headers: list[tuple[bytes, bytes]] | None = None) -> httpx.Request:
    return httpx.Request(method, url, headers=headers or [(b"Host", b"test")])


async def fetch(t: LeanTransport, request: httpx.Request) -> tuple[httpx.Response, bytes]:
    response = await t.handle_async_request(request)
    return response, await response.aread()


def per_path(answers: dict[bytes, list[bytes]]) -> Handler:
    """Answer each request with the writes listed for its path (one write per item); default OK."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            raw = await read_request(reader)
            for part in answers.get(raw.split(b" ", 2)[1], [OK]):
                writer.write(part)
                await writer.drain()
                await asyncio.sleep(0.01)  # separate TCP reads for the next part (not needed for correctness)

    return handler


async def until_closed(conn: Connection) -> None:
    """Poll until the protocol closed ``conn``; the run's DEADLINE, not this count, bounds the wait."""
    for _ in range(1_000_000):
        if conn.closed:
            return
        await asyncio.sleep(0.001)


# -- bytes after the end of a response --------------------------------------------------------------
@pytest.mark.parametrize(
    "writes",
    [
        [OK + INJECTED],  # one read: the parser sees both messages
        [OK[:-2], b"ok" + INJECTED],  # head first: the raw Content-Length fast path sees the rest
        [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n" + INJECTED],
        [OK + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"],  # a second Content-Length
        [OK + b"garbage"],
    ],
    ids=["one-read", "fast-path", "chunked", "second-content-length", "garbage"],
)
def test_trailing_bytes_are_never_parsed_and_close_the_connection(run: Any, writes: list[bytes]) -> None:
    async def main() -> None:
        async with AsyncBackend(per_path({b"/sloppy": writes})) as b:
            t = LeanTransport()
            response, body = await fetch(t, req(b.url("/sloppy")))
            assert (response.status_code, body) == (200, b"ok")
            assert "set-cookie" not in response.headers
            assert response.headers.get_list("content-length") in ([], ["2"])
            assert len(response.headers.raw) == 1
            response, body = await fetch(t, req(b.url("/next")))
            assert (response.status_code, body) == (200, b"ok")
            assert response.headers.raw == [(b"Content-Length", b"2")]
            assert b.connections == 2  # the sloppy connection was not reused
            await t.aclose()

    run(main())


@pytest.mark.parametrize("status", [b"204 No Content", b"304 Not Modified"])
def test_bodyless_status_followed_by_bytes_closes_the_connection(run: Any, status: bytes) -> None:
    async def main() -> None:
        sloppy = [b"HTTP/1.1 " + status + b"\r\n\r\nhello" + INJECTED]
        async with AsyncBackend(per_path({b"/sloppy": sloppy})) as b:
            t = LeanTransport()
            response, body = await fetch(t, req(b.url("/sloppy")))
            assert (response.status_code, body, response.headers.raw) == (int(status[:3]), b"", [])
            _, body = await fetch(t, req(b.url("/next")))
            assert body == b"ok" and b.connections == 2
            await t.aclose()

    run(main())


def test_head_response_followed_by_bytes_closes_the_connection(run: Any) -> None:
    async def main() -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
        async with AsyncBackend(per_path({b"/sloppy": [head + b"hello"], b"/tidy": [head]})) as b:
            t = LeanTransport()
            for path, connections in [(b"/tidy", 1), (b"/tidy", 1), (b"/sloppy", 1), (b"/tidy", 2)]:
                response, body = await fetch(t, req(b.url(path.decode()), "HEAD"))
                assert (response.status_code, body) == (200, b"")
                assert response.headers.raw == [(b"Content-Length", b"5")]
                assert b.connections == connections  # a tidy HEAD keeps the connection
            await t.aclose()

    run(main())


def test_late_bytes_on_an_idle_connection_close_it(run: Any) -> None:
    async def main() -> None:
        released = asyncio.Event()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            await read_request(reader)
            writer.write(OK)
            if n == 1:
                await released.wait()
                writer.write(INJECTED + b"evil!")  # after the response was complete and pooled
            while True:
                await read_request(reader)
                writer.write(OK)

        async with AsyncBackend(handler) as b:
            t = LeanTransport()
            await fetch(t, req(b.url()))
            pool = t.origin_pool(*b.key())
            assert pool is not None and len(pool.idle) == 1
            conn = pool.idle[0]
            released.set()
            await until_closed(conn)
            response, body = await fetch(t, req(b.url()))
            assert (body, response.headers.raw) == (b"ok", [(b"Content-Length", b"2")])
            assert b.connections == 2
            await t.aclose()

    run(main())


def test_late_bytes_after_a_complete_response_still_being_read_close_it(run: Any) -> None:
    """The response is complete but its body not yet consumed (the connection is still held)."""

    async def main() -> None:
        late = asyncio.Event()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            await writer.drain()
            await late.wait()
            writer.write(b"2\r\nok\r\n0\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)  # a separate read for the late bytes (not needed to pass)
            writer.write(INJECTED + b"evil!")
            while True:
                await read_request(reader)
                writer.write(OK)

        async with AsyncBackend(handler) as b:
            t = LeanTransport()
            response = await t.handle_async_request(req(b.url()))
            stream = response.stream
            assert isinstance(stream, ResponseBody)
            conn = stream.connection
            assert conn is not None and not conn.done
            late.set()
            await until_closed(conn)
            assert await response.aread() == b"ok"
            assert response.headers.raw == [(b"Transfer-Encoding", b"chunked")]
            _, body = await fetch(t, req(b.url()))
            assert body == b"ok" and b.connections == 2
            await t.aclose()

    run(main())


# -- status line ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "line",
    [b"HTTP/1.1 999 Nine", b"HTTP/1.1 000 Zero", b"HTTP/1.1 99 Short", b"HTTP/1.1 2x0 OK", b"HTTP/1.1"],
)
def test_status_outside_100_599_or_malformed_is_a_protocol_error(run: Any, line: bytes) -> None:
    async def main() -> None:
        async with AsyncBackend(keep_alive(line + b"\r\nContent-Length: 2\r\n\r\nok")) as b:
            t = LeanTransport(read_timeout=5.0)
            with pytest.raises(httpx.RemoteProtocolError) as info:
                await fetch(t, req(b.url()))
            assert info.value.request_sent is True  # type: ignore[attr-defined]
            if line[9:12].isdigit():
                assert str(info.value) == f"Invalid status code {int(line[9:12])} in the response."
            pool = t.origin_pool(*b.key())
            assert pool is not None and pool.total == 0
            await t.aclose()

    run(main())


def test_interim_responses_then_a_final_one_still_work(run: Any) -> None:
    async def main() -> None:
        interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n"
        hints = b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        async with AsyncBackend(per_path({b"/": [interim, hints, OK]})) as b:
            t = LeanTransport()
            for _ in range(2):
                response, body = await fetch(t, req(b.url()))
                assert (response.status_code, body) == (200, b"ok")
                assert response.headers.raw == [(b"Content-Length", b"2")]
            assert b.connections == 1
            await t.aclose()

    run(main())


# -- no double send ---------------------------------------------------------------------------------
def closes_after_reading_request_2(seen: list[bytes]) -> Handler:
    """Connection 1 answers once, then reads the next request completely and closes unanswered."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        seen.append(await read_request(reader))
        writer.write(OK)
        if n == 1:
            seen.append(await read_request(reader))
            return
        while True:
            seen.append(await read_request(reader))
            writer.write(OK)

    return handler


@pytest.mark.parametrize(
    "headers",
    [[(b"Host", b"x")], [(b"Host", b"x"), (b"Content-Length", b"0")]],
    ids=["no-body", "content-length-0"],
)
def test_bodyless_post_on_a_stale_connection_is_not_sent_twice(run: Any, headers: Any) -> None:
    async def main() -> None:
        seen: list[bytes] = []
        async with AsyncBackend(closes_after_reading_request_2(seen)) as b:
            t = LeanTransport()
            await fetch(t, req(b.url()))
            with pytest.raises(httpx.RemoteProtocolError) as info:
                await fetch(t, req(b.url("/post"), "POST", headers))
            assert info.value.request_sent is True  # type: ignore[attr-defined]
            assert [raw.split(b"\r\n")[0] for raw in seen] == [b"GET / HTTP/1.1", b"POST /post HTTP/1.1"]
            assert b.connections == 1
            pool = t.origin_pool(*b.key())
            assert pool is not None and pool.total == 0
            await t.aclose()

    run(main())


@pytest.mark.parametrize(
    ("method", "headers"),
    [
        ("GET", [(b"Host", b"x")]),
        ("OPTIONS", [(b"Host", b"x")]),
        ("POST", [(b"Host", b"x"), (b"Idempotency-Key", b"k-1")]),
    ],
    ids=["get", "options", "post-idempotency-key"],
)
def test_replayable_request_on_a_stale_connection_is_retried_once(
    run: Any, method: str, headers: Any
) -> None:
    async def main() -> None:
        seen: list[bytes] = []
        async with AsyncBackend(closes_after_reading_request_2(seen)) as b:
            t = LeanTransport()
            await fetch(t, req(b.url()))
            response, body = await fetch(t, req(b.url("/again"), method, headers))
            assert (response.status_code, body) == (200, b"ok")
            line = f"{method} /again HTTP/1.1".encode()
            assert [raw.split(b"\r\n")[0] for raw in seen].count(line) == 2
            assert b.connections == 2
            await t.aclose()

    run(main())
