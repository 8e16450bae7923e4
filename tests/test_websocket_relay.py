"""The WebSocket relay on its own: lbapp.websocket's Session and lbapp.wsupstream in front of one
echo backend, without balancing (tests/test_websocket.py covers the load balancer end to end).

Real parts only: an echo backend subprocess, the relay served by uvicorn in a thread, and
clients from the `websockets` package.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from lbapp.headers import add_forwarding_headers, parse_request_headers
from lbapp.websocket import Session, wire_code
from lbapp.wsupstream import (
    Unreachable,
    WebSocketConfig,
    accept_message,
    deny,
    forward_headers,
    open_upstream,
    refusal,
)

from .conftest import EchoBackend, ThreadedServer


class DirectRelay:
    """A minimal ASGI app: every WebSocket goes to one backend URL through the relay."""

    def __init__(self, url: str, config: WebSocketConfig) -> None:
        self.url = url
        self.config = config
        self.sessions: list[Session] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            return
        assert (await receive())["type"] == "websocket.connect"
        head = parse_request_headers(scope["headers"], False)
        peer = scope["client"][0]
        add_forwarding_headers(head, peer, peer, "http", False)
        query = scope["query_string"].decode()
        target = scope["raw_path"].decode() + ("?" + query if query else "")
        try:
            upstream = await open_upstream(
                self.url, target, forward_headers(head.headers), scope["subprotocols"], self.config
            )
        except InvalidStatus as exc:
            await deny(scope, send, *refusal(exc.response))
            return
        except Unreachable:
            await deny(scope, send, 502, [], b'{"error": "bad gateway"}')
            return
        await send(accept_message(upstream, []))
        session = Session(upstream, receive, send, self.config)
        self.sessions.append(session)
        await session.run()


@pytest.fixture(scope="module")
def backend() -> Iterator[EchoBackend]:
    echo = EchoBackend("ws-echo").start()
    yield echo
    echo.stop()


@pytest.fixture
def relay(backend: EchoBackend) -> Iterator[tuple[ThreadedServer, DirectRelay]]:
    app = DirectRelay(backend.url, WebSocketConfig(max_message=2 * 1024 * 1024, idle_timeout=0))
    with ThreadedServer(app) as server:
        yield server, app


def ws_url(server: ThreadedServer, path: str) -> str:
    return server.url.replace("http://", "ws://") + path


def test_wire_codes_never_carry_status_only_codes() -> None:
    assert [wire_code(c) for c in (1005, 1006, 1015, None)] == [1000, 1011, 1011, 1000]
    assert [wire_code(c) for c in (1000, 1001, 1011, 4001)] == [1000, 1001, 1011, 4001]


def test_text_binary_and_a_large_message_cross_intact(relay: tuple[ThreadedServer, DirectRelay]) -> None:
    server, app = relay
    big = bytes(range(256)) * 4096  # 1 MiB, every byte value

    async def run() -> None:
        async with connect(ws_url(server, "/ws"), max_size=None) as ws:
            await ws.send("héllo")
            assert await ws.recv() == "héllo"
            await ws.send(b"\x00\xff\x10")
            assert await ws.recv() == b"\x00\xff\x10"
            await ws.send(big)
            assert await ws.recv() == big

    asyncio.run(run())
    session = app.sessions[-1]
    assert (session.messages_in, session.messages_out) == (3, 3)
    assert session.bytes_in == session.bytes_out == len("héllo".encode()) + 3 + len(big)


def test_handshake_headers_reach_the_backend(relay: tuple[ThreadedServer, DirectRelay]) -> None:
    server, _ = relay
    extra = {"Origin": "https://app.example", "Cookie": "a=1; b=2", "Authorization": "Bearer t0k"}

    async def run() -> dict[str, Any]:
        async with connect(ws_url(server, "/ws/x%2Fy?q=1"), additional_headers=extra) as ws:
            await ws.send("!info")
            return dict(json.loads(await ws.recv()))

    info = asyncio.run(run())
    headers = info["headers"]
    assert headers["origin"] == "https://app.example"
    assert headers["cookie"] == "a=1; b=2" and headers["authorization"] == "Bearer t0k"
    assert headers["x-forwarded-for"] == "127.0.0.1" and headers["x-forwarded-proto"] == "http"
    assert headers["host"] == f"127.0.0.1:{server.port}"  # the client's Host, like the HTTP path
    assert info["raw_path"] == "/ws/x%2Fy" and info["query"] == "q=1"
    names = [name for name, _ in info["header_list"]]
    assert names.count("host") == 1 and names.count("sec-websocket-key") == 1
    assert "sec-websocket-extensions" not in names  # compression is per hop; not asked upstream


def test_subprotocol_is_the_backends_choice(relay: tuple[ThreadedServer, DirectRelay]) -> None:
    server, _ = relay

    async def run(offered: list[str] | None) -> str | None:
        async with connect(ws_url(server, "/ws"), subprotocols=offered) as ws:  # type: ignore[arg-type]
            return ws.subprotocol

    assert asyncio.run(run(["other", "echo.v1", "echo.v2"])) == "echo.v2"  # backend's preference
    assert asyncio.run(run(["echo.v1"])) == "echo.v1"
    assert asyncio.run(run(["other"])) is None  # none offered that it speaks: none, never invented
    assert asyncio.run(run(None)) is None


def test_refusals_reach_the_client_as_http_responses(relay: tuple[ThreadedServer, DirectRelay]) -> None:
    server, _ = relay

    async def run(path: str) -> Any:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(ws_url(server, path)):
                pass
        return refused.value.response

    response = asyncio.run(run("/ws/refuse/401"))
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer realm="echo"'
    assert json.loads(bytes(response.body)) == {"server": "ws-echo", "error": "refused"}
    assert asyncio.run(run("/ws/refuse/403")).status_code == 403


def test_close_codes_pass_both_ways(relay: tuple[ThreadedServer, DirectRelay], backend: EchoBackend) -> None:
    server, app = relay

    async def backend_closes() -> tuple[int, str]:
        async with connect(ws_url(server, "/ws/close/4001?reason=bye")) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
        assert closed.value.rcvd is not None
        return closed.value.rcvd.code, closed.value.rcvd.reason

    async def client_closes() -> None:
        async with connect(ws_url(server, "/ws/client-close")) as ws:
            await ws.send("one")
            assert await ws.recv() == "one"
            await ws.close(4002, "client bye")

    assert asyncio.run(backend_closes()) == (4001, "bye")
    asyncio.run(client_closes())
    closes = httpx.get(backend.url + "/ws-closes").json()
    assert {"path": "/ws/client-close", "code": 4002, "reason": "client bye"} in closes
    assert app.sessions[-1].ended_by == "client" and app.sessions[-1].close_code == 4002


def test_a_message_over_the_limit_closes_with_1009(relay: tuple[ThreadedServer, DirectRelay]) -> None:
    server, app = relay

    async def run() -> int:
        async with connect(ws_url(server, "/ws"), max_size=None) as ws:
            await ws.send(b"x" * (2 * 1024 * 1024 + 1))
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
        assert closed.value.rcvd is not None
        return closed.value.rcvd.code

    assert asyncio.run(run()) == 1009
    assert app.sessions[-1].ended_by == "limit"


def test_idle_sessions_close_with_1001(backend: EchoBackend) -> None:
    app = DirectRelay(backend.url, WebSocketConfig(idle_timeout=0.3))
    with ThreadedServer(app) as server:

        async def run() -> tuple[int, str]:
            async with connect(ws_url(server, "/ws")) as ws:
                await ws.send("active")
                assert await ws.recv() == "active"
                with pytest.raises(ConnectionClosed) as closed:
                    async with asyncio.timeout(10):
                        await ws.recv()
            assert closed.value.rcvd is not None
            return closed.value.rcvd.code, closed.value.rcvd.reason

        assert asyncio.run(run()) == (1001, "idle timeout")
    assert app.sessions[-1].ended_by == "idle"
    assert app.sessions[-1].messages_in == 1  # the timer started over after the message


def test_unreachable_backend_is_a_502() -> None:
    closed = EchoBackend("gone")
    closed.sock.close()  # a port nobody listens on
    app = DirectRelay(closed.url, WebSocketConfig())
    with ThreadedServer(app) as server:

        async def run() -> int:
            with pytest.raises(InvalidStatus) as refused:
                async with connect(ws_url(server, "/ws")):
                    pass
            return int(refused.value.response.status_code)

        assert asyncio.run(run()) == 502
