"""Raw-socket backends for tests: exact bytes on the wire, including what a real server never sends.

`AsyncBackend` runs in the test's own event loop (transport unit tests drive it with asyncio).
`RawBackend` runs a scripted blocking-socket server in threads on 127.0.0.1, so it can stand behind a
real lbapp (`conftest.run_lb`) in end-to-end tests; it records every request it read, per
connection, so a test can count exactly what reached the backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)")


def loop_factories() -> list[Any]:
    """pytest params: the default asyncio loop, and uvloop when installed."""
    params: list[Any] = [pytest.param(asyncio.new_event_loop, id="asyncio")]
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return params
    return [*params, pytest.param(uvloop.new_event_loop, id="uvloop")]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """Read one request (head and body) and return its exact wire bytes."""
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        while True:
            size = await reader.readuntil(b"\r\n")
            head += size + await reader.readexactly(int(size, 16) + 2)
            if int(size, 16) == 0:
                return head
    match = re.search(rb"content-length: *(\d+)", lower)
    return head + (await reader.readexactly(int(match.group(1))) if match else b"")


class AsyncBackend:
    """An asyncio server; ``handler(reader, writer, n)`` runs for the n-th accepted connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.port = 0
        self.closed = asyncio.Event()  # set each time a connection handler returns
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> AsyncBackend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for writer in self._writers:
            writer.close()
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        try:
            await self.handler(reader, writer, self.connections)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # peer went away, or the test loop is shutting down
        finally:
            writer.close()
            self.closed.set()

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def key(self) -> tuple[str, str, int]:
        return ("http", "127.0.0.1", self.port)


def keep_alive(response: bytes) -> Handler:
    """Answer every request on the connection with the same bytes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            await read_request(reader)
            writer.write(response)
            await writer.drain()

    return handler


class RawConnection:
    """One accepted connection of a `RawBackend`, as its script sees it (blocking, bounded by timeouts)."""

    def __init__(self, backend: RawBackend, sock: socket.socket, number: int) -> None:
        self.backend = backend
        self.sock = sock
        self.number = number  # 1 for the first connection the backend accepted
        self.closed_by_peer = threading.Event()
        self._buffer = b""

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            self.closed_by_peer.set()
            return False
        self._buffer += data
        return True

    def read_request(self) -> bytes | None:
        """One request's exact bytes (Content-Length or no body), recorded; None at end of stream."""
        try:
            while b"\r\n\r\n" not in self._buffer:
                if not self._fill():
                    return None
            end = self._buffer.index(b"\r\n\r\n") + 4
            match = _LENGTH.search(self._buffer[:end].lower())
            end += int(match.group(1)) if match else 0
            while len(self._buffer) < end:
                if not self._fill():
                    return None
        except OSError:
            self.closed_by_peer.set()
            return None
        request, self._buffer = self._buffer[:end], self._buffer[end:]
        self.backend.record(self.number, request)
        return request

    def wait_closed_by_peer(self) -> bool:
        """Read (and discard) until the peer closes; True if it did."""
        try:
            while self._fill():
                pass
        except OSError:
            self.closed_by_peer.set()
        return self.closed_by_peer.is_set()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reset(self) -> None:
        """Close with a TCP RST (SO_LINGER 0) instead of a FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


class RawBackend:
    """A threaded TCP server on 127.0.0.1 that runs ``script(connection)`` for each connection.

    ``requests`` lists (connection number, request bytes) for every request a script read.
    """

    def __init__(self, script: Callable[[RawConnection], None], timeout: float = 10.0) -> None:
        self.script = script
        self.timeout = timeout
        self.requests: list[tuple[int, bytes]] = []
        self.connections: list[RawConnection] = []
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    def __enter__(self) -> RawBackend:
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self._threads.append(accept)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        self._listener.close()
        with self._lock:
            connections = list(self.connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
            conn.sock.close()
        for thread in self._threads:
            thread.join(timeout=10)

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return  # listener closed
            sock.settimeout(self.timeout)
            with self._lock:
                conn = RawConnection(self, sock, len(self.connections) + 1)
                self.connections.append(conn)
            thread = threading.Thread(target=self._run, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _run(self, conn: RawConnection) -> None:
        try:
            self.script(conn)
        except OSError:
            pass  # the peer went away
        finally:
            conn.sock.close()

    def record(self, number: int, request: bytes) -> None:
        with self._lock:
            self.requests.append((number, request))

    def received(self, request_line: bytes) -> list[int]:
        """Connection numbers of the recorded requests starting with ``request_line``."""
        with self._lock:
            return [number for number, raw in self.requests if raw.startswith(request_line)]


def path_of(request: bytes) -> bytes:
    """The request-target of a request's first line."""
    return request.split(b" ", 2)[1]
