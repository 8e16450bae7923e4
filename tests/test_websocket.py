"""WebSocket through the load balancer, end to end: echo backends (subprocesses), lbapp served by
uvicorn, clients from the `websockets` package and a headless Chromium page.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from lbapp import create_app
from lbapp.cli import build_parser, server_config
from lbapp.settings import load_settings
from lbapp.wsserver import GracefulWebSocketProtocol

from .conftest import (
    EchoBackend,
    LauncherProcess,
    LBProcess,
    ThreadedServer,
    listening_socket,
    run_lb,
    wait_until,
)
from .test_metrics import needs, prometheus_samples
from .test_status_page import chromium

MiB = 1024 * 1024


def ws_url(server: ThreadedServer | LBProcess, path: str = "/ws") -> str:
    return server.url.replace("http://", "ws://") + path


async def info(ws: ClientConnection) -> dict[str, Any]:
    await ws.send("!info")
    return dict(json.loads(await ws.recv()))


async def refused(url: str, **options: Any) -> Any:
    with pytest.raises(InvalidStatus) as caught:
        async with connect(url, **options):
            pass
    return caught.value.response


async def closed_by_peer(ws: ClientConnection) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed) as caught:
        async with asyncio.timeout(20):
            while True:
                await ws.recv()
    assert caught.value.rcvd is not None, caught.value
    return caught.value.rcvd.code, caught.value.rcvd.reason


@pytest.fixture(scope="module")
def lb(echo_backends: list[EchoBackend]) -> Iterator[ThreadedServer]:
    with run_lb([b.url for b in echo_backends]) as server:
        yield server


def test_text_binary_and_a_1mib_message_cross_intact(lb: ThreadedServer) -> None:
    big = os.urandom(MiB)

    async def run() -> None:
        async with connect(ws_url(lb), max_size=2 * MiB) as ws:
            await ws.send("hello, wörld")
            assert await ws.recv() == "hello, wörld"
            await ws.send(b"\x00\x01\xfe\xff")
            assert await ws.recv() == b"\x00\x01\xfe\xff"
            await ws.send(big)
            echoed = await ws.recv()
            assert isinstance(echoed, bytes) and echoed == big
            await ws.send("x" * MiB)
            assert await ws.recv() == "x" * MiB
            latency = await asyncio.wait_for(await ws.ping(), 10)  # answered by lbapp's side
            assert latency >= 0

    asyncio.run(run())


def test_the_subprotocol_is_the_backends_choice(lb: ThreadedServer) -> None:
    async def run(offered: list[str] | None) -> tuple[str | None, str | None]:
        async with connect(ws_url(lb), subprotocols=offered) as ws:  # type: ignore[arg-type]
            header = ws.response.headers.get("sec-websocket-protocol") if ws.response else None
            return ws.subprotocol, header

    assert asyncio.run(run(["chat", "echo.v1", "echo.v2"])) == ("echo.v2", "echo.v2")
    assert asyncio.run(run(["echo.v1"])) == ("echo.v1", "echo.v1")
    # Nothing the backend speaks, or nothing offered: no subprotocol, and no empty header either.
    assert asyncio.run(run(["chat"])) == (None, None)
    assert asyncio.run(run(None)) == (None, None)


def test_handshake_headers_reach_the_backend(lb: ThreadedServer) -> None:
    sent = {
        "Origin": "https://app.example",
        "Cookie": "session=abc; theme=dark",
        "Authorization": "Bearer t0ken",
        "X-Forwarded-For": "203.0.113.9",  # from an untrusted peer: replaced, not appended to
        "X-Request-ID": "ws-req-1",
    }

    async def run() -> tuple[dict[str, Any], str | None]:
        async with connect(ws_url(lb, "/ws/a%2Fb?x=1"), additional_headers=sent) as ws:
            assert ws.response is not None
            return await info(ws), ws.response.headers.get("x-request-id")

    document, response_id = asyncio.run(run())
    headers = document["headers"]
    assert headers["origin"] == "https://app.example"
    assert headers["cookie"] == "session=abc; theme=dark"
    assert headers["authorization"] == "Bearer t0ken"
    assert headers["x-forwarded-for"] == "127.0.0.1" and headers["x-real-ip"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "ws" and headers["x-forwarded-host"] == f"127.0.0.1:{lb.port}"
    assert headers["x-request-id"] == "ws-req-1" and response_id == "ws-req-1"
    assert document["raw_path"] == "/ws/a%2Fb" and document["query"] == "x=1"
    names = [name for name, _ in document["header_list"]]
    for name in ("host", "upgrade", "connection", "sec-websocket-key", "sec-websocket-version"):
        assert names.count(name) == 1, name


def test_close_codes_and_reasons_pass_both_ways(lb: ThreadedServer, echo_backends: list[EchoBackend]) -> None:
    async def backend_closes(path: str) -> tuple[int, str]:
        async with connect(ws_url(lb, path)) as ws:
            return await closed_by_peer(ws)

    async def client_closes(path: str, code: int | None, reason: str) -> None:
        async with connect(ws_url(lb, path)) as ws:
            await ws.send("ping")
            assert await ws.recv() == "ping"
            await ws.close(code, reason)  # type: ignore[arg-type]

    assert asyncio.run(backend_closes("/ws/close/4001?reason=done")) == (4001, "done")
    assert asyncio.run(backend_closes("/ws/close/1000")) == (1000, "")

    async def commanded() -> tuple[int, str]:
        async with connect(ws_url(lb)) as ws:
            await ws.send("!close 4404 not here")
            return await closed_by_peer(ws)

    assert asyncio.run(commanded()) == (4404, "not here")
    asyncio.run(client_closes("/ws/client-4002", 4002, "client bye"))
    asyncio.run(client_closes("/ws/client-1001", 1001, ""))
    asyncio.run(client_closes("/ws/client-no-code", None, ""))  # an empty close frame: 1005

    def seen() -> dict[str, tuple[int, str]]:
        found = {}
        for backend in echo_backends:
            for close in httpx.get(backend.url + "/ws-closes").json():
                found[close["path"]] = (close["code"], close["reason"])
        return found

    closes = wait_until(lambda: len(seen()) >= 3 and seen())
    assert closes["/ws/client-4002"] == (4002, "client bye")
    assert closes["/ws/client-1001"] == (1001, "")
    assert closes["/ws/client-no-code"] == (1000, "")  # 1005 is never sent: mapped to 1000


def test_a_backend_refusal_reaches_the_client_as_its_http_response(lb: ThreadedServer) -> None:
    response = asyncio.run(refused(ws_url(lb, "/ws/refuse/401")))
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer realm="echo"'
    assert response.headers["x-request-id"]
    assert json.loads(bytes(response.body))["error"] == "refused"
    assert asyncio.run(refused(ws_url(lb, "/ws/refuse/403"))).status_code == 403


def test_unreachable_backends_are_retried_then_502(echo_factory: Any) -> None:
    alive = echo_factory("alive")
    dead = EchoBackend("dead")
    dead.sock.close()  # nobody listens there

    async def server_of(server: ThreadedServer) -> str:
        async with connect(ws_url(server)) as ws:
            return str((await info(ws))["server"])

    with run_lb([dead.url, alive.url], outlier_consecutive_failures=0) as server:
        assert {asyncio.run(server_of(server)) for _ in range(4)} == {"alive"}
        errors = server.app.state.stats.upstream_errors
        assert errors[("/", dead.url, "connect")] >= 1  # counted as the HTTP path counts them
    with run_lb([dead.url]) as server:
        response = asyncio.run(refused(ws_url(server)))
        assert response.status_code == 502
        assert json.loads(bytes(response.body)) == {"error": "bad gateway"}


def test_a_backend_that_never_answers_the_handshake_is_a_504() -> None:
    silent = listening_socket()  # connections wait in its backlog; nothing is ever read or sent
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    try:
        with run_lb([url], upstream_timeout=0.5) as server:
            response = asyncio.run(refused(ws_url(server)))
            errors = server.app.state.stats.upstream_errors
    finally:
        silent.close()
    assert response.status_code == 504
    assert json.loads(bytes(response.body)) == {"error": "gateway timeout"}
    assert errors[("/", url, "timeout")] == 1


def test_idle_sessions_are_closed_with_1001(echo_factory: Any) -> None:
    backend = echo_factory("idle")
    with run_lb([backend.url], websocket_idle_timeout=0.5) as server:

        async def run() -> tuple[int, str]:
            async with connect(ws_url(server, "/ws/idle")) as ws:
                await ws.send("one")
                assert await ws.recv() == "one"
                return await closed_by_peer(ws)

        assert asyncio.run(run()) == (1001, "idle timeout")
    closes = httpx.get(backend.url + "/ws-closes").json()
    assert {"path": "/ws/idle", "code": 1001, "reason": "idle timeout"} in closes


def test_all_backends_down_is_503(echo_factory: Any) -> None:
    backend = echo_factory("only")
    with run_lb([backend.url]) as server:
        assert (
            httpx.post(server.url + "/lb-admin/backends/drain", params={"url": backend.url}).status_code
            == 200
        )
        response = asyncio.run(refused(ws_url(server)))
    assert response.status_code == 503 and response.headers["retry-after"] == "1"


def test_sessions_are_balanced_and_keep_affinity(echo_backends: list[EchoBackend]) -> None:
    urls = [b.url for b in echo_backends]

    async def servers(server: ThreadedServer, count: int, **options: Any) -> list[str]:
        names = []
        for _ in range(count):
            async with connect(ws_url(server), **options) as ws:
                names.append(str((await info(ws))["server"]))
        return names

    with run_lb(urls) as server:
        assert sorted(asyncio.run(servers(server, 6))) == sorted(["backend-1", "backend-2", "backend-3"] * 2)
    with run_lb(urls, algorithm="consistent_hash", hash_key="header:X-User") as server:
        for user in ("ann", "bob", "cy"):
            assert len(set(asyncio.run(servers(server, 4, additional_headers={"X-User": user})))) == 1
    with run_lb(urls, algorithm="sticky", sticky_secret="s" * 32) as server:

        async def sticky() -> tuple[str, list[str]]:
            async with connect(ws_url(server)) as ws:
                assert ws.response is not None
                cookie = ws.response.headers["set-cookie"].split(";")[0]  # set on the 101
                first = str((await info(ws))["server"])
            return first, await servers(server, 4, additional_headers={"Cookie": cookie})

        first, later = asyncio.run(sticky())
        assert later == [first] * 4


def test_a_drained_backend_keeps_its_open_session(echo_factory: Any) -> None:
    a, b = echo_factory("a"), echo_factory("b")
    with run_lb([a.url, b.url]) as server:

        async def run() -> None:
            async with connect(ws_url(server)) as ws:
                assert (await info(ws))["server"] == "a"
                async with httpx.AsyncClient(base_url=server.url) as client:
                    drained = await client.post("/lb-admin/backends/drain", params={"url": a.url})
                    assert drained.json()["state"] == "draining" and drained.json()["in_flight"] == 1
                for _ in range(3):  # new sessions avoid it...
                    async with connect(ws_url(server)) as other:
                        assert (await info(other))["server"] == "b"
                await ws.send("still here")  # ...the open one goes on
                assert await ws.recv() == "still here"

        asyncio.run(run())


def test_backend_max_conns_counts_open_sessions(echo_factory: Any) -> None:
    backend = echo_factory("capped")
    with run_lb([backend.url], backend_max_conns=1, queue_timeout=0.2) as server:

        async def run() -> int:
            async with connect(ws_url(server)) as ws:
                await ws.send("hold")
                assert await ws.recv() == "hold"
                return int((await refused(ws_url(server))).status_code)

        assert asyncio.run(run()) == 503
        pool = server.app.state.clusters.default.pool
        wait_until(lambda: pool.backends[0].in_flight == 0)


def test_a_backend_killed_mid_session_closes_the_client_with_1011(echo_factory: Any) -> None:
    victim = echo_factory("victim")
    with run_lb([victim.url]) as server:

        async def run() -> tuple[int, str]:
            async with connect(ws_url(server)) as ws:
                await ws.send("before")
                assert await ws.recv() == "before"
                victim.kill()
                return await closed_by_peer(ws)

        code, reason = asyncio.run(run())
        assert code == 1011 and reason == "backend connection lost"
        stats = server.app.state.websocket_stats
        wait_until(lambda: not stats.open)
        assert server.app.state.clusters.default.pool.backends[0].in_flight == 0


def loop_of(server: ThreadedServer) -> asyncio.AbstractEventLoop:
    return server.server.servers[0].get_loop()  # type: ignore[no-any-return]


def lb_tasks(server: ThreadedServer) -> int:
    async def count() -> int:
        return len(asyncio.all_tasks())

    return asyncio.run_coroutine_threadsafe(count(), loop_of(server)).result(timeout=10)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_200_sessions_leak_no_tasks_or_fds(echo_factory: Any) -> None:
    backend = echo_factory("many")
    with run_lb([backend.url]) as server:

        async def sessions(count: int, batch: int) -> None:
            async def one(i: int) -> None:
                async with connect(ws_url(server)) as ws:
                    await ws.send(f"m{i}")
                    assert await ws.recv() == f"m{i}"

            for start in range(0, count, batch):
                await asyncio.gather(*(one(i) for i in range(start, start + batch)))

        asyncio.run(sessions(5, 5))  # warm-up: lazily created things exist from here on
        stats = server.app.state.websocket_stats
        wait_until(lambda: not stats.open)
        tasks, fds = lb_tasks(server), open_fds()
        asyncio.run(sessions(200, 20))
        wait_until(lambda: not stats.open and lb_tasks(server) <= tasks and open_fds() <= fds)
        assert sum(stats.sessions.values()) == 205
        assert server.app.state.clusters.default.pool.backends[0].in_flight == 0


def test_metrics_and_access_log_after_a_known_sequence(
    echo_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    one, two = echo_factory("one"), echo_factory("two")
    with run_lb([one.url, two.url], access_log=True) as server:
        caplog.set_level(logging.INFO, logger="lbapp.access")

        async def run() -> None:
            for _ in range(2):  # round robin: one session on each backend
                async with connect(ws_url(server)) as ws:
                    await ws.send("abc")  # 3 bytes
                    assert await ws.recv() == "abc"
                    await ws.send(b"\x00" * 1000)
                    assert await ws.recv() == b"\x00" * 1000
                    await ws.close(4000, "bye")
            await refused(ws_url(server, "/ws/refuse/403"))  # third handshake: backend one

        asyncio.run(run())
        wait_until(lambda: not server.app.state.websocket_stats.open)
        samples = prometheus_samples(httpx.get(server.url + "/metrics").text)

    def value(name: str, **labels: str) -> float:
        return samples.get((name, frozenset(labels.items())), 0.0)

    for url in (one.url, two.url):
        at = {"route": "/", "backend": url}
        assert value("lb_websocket_sessions_total", **at) == 1
        assert value("lb_websocket_connections", **at) == 0
        assert value("lb_websocket_messages_total", direction="client_to_backend", **at) == 2
        assert value("lb_websocket_messages_total", direction="backend_to_client", **at) == 2
        assert value("lb_websocket_bytes_total", direction="client_to_backend", **at) == 1003
        assert value("lb_websocket_bytes_total", direction="backend_to_client", **at) == 1003
        assert value("lb_websocket_duration_seconds_count", **at) == 1
        assert value("lb_requests_total", method="GET", code="1xx", **at) == 1
    assert value("lb_requests_total", route="/", backend=one.url, method="GET", code="4xx") == 1
    lines = [r.access for r in caplog.records if hasattr(r, "access")]  # type: ignore[attr-defined]
    sessions = [line for line in lines if line["status"] == 101]
    assert len(sessions) == 2 and len(lines) == 3
    for line in sessions:
        assert line["bytes_in"] == line["bytes_out"] == 1003
        assert (line["ws_close_code"], line["ws_ended_by"]) == (4000, "client")
        assert (line["ws_messages_in"], line["ws_messages_out"]) == (2, 2)
        assert line["total_ms"] >= line["upstream_ms"] > 0
    assert [line["status"] for line in lines if line["status"] != 101] == [403]


def test_a_stalled_backend_pushes_back_on_the_client(echo_factory: Any) -> None:
    backend = echo_factory("stalling")
    block = os.urandom(MiB)
    with run_lb([backend.url]) as server:

        async def run() -> int:
            async with connect(ws_url(server), max_size=None, close_timeout=1) as ws:
                await ws.send("!stall 60")  # the backend reads nothing more
                sent = 0
                for _ in range(256):  # 256 MiB if nothing pushed back
                    try:
                        async with asyncio.timeout(3):
                            await ws.send(block)
                    except TimeoutError:
                        break
                    sent += len(block)
                ws.transport.abort()
                return sent

        sent = asyncio.run(run())
    # What a full path of socket buffers and one message per hop holds: far below what was offered.
    assert sent < 64 * MiB, f"{sent >> 20} MiB accepted while the backend read nothing"


def test_a_slow_client_pushes_back_on_a_flooding_backend(echo_factory: Any) -> None:
    backend = echo_factory("flooding")
    with run_lb([backend.url]) as server:
        stats = server.app.state.websocket_stats

        def relayed() -> int:
            return sum(session.messages_out for session in list(stats.open))

        async def run() -> tuple[int, int]:
            async with connect(ws_url(server), max_size=2 * MiB, max_queue=1, compression=None) as ws:
                await ws.send("!flood 200 1048576")  # 200 MiB toward a client that reads nothing
                seen = 0
                for _ in range(30):  # 3 s of looking: a slow machine only ever relays less
                    await asyncio.sleep(0.1)
                    seen = max(seen, relayed())
                received = 0
                for _ in range(200):  # then everything arrives, in order and whole
                    message = await asyncio.wait_for(ws.recv(), 30)
                    received += len(message) == MiB
                return seen, received

        seen, received = asyncio.run(run())
    assert seen < 64, f"{seen} MiB relayed to a client that read nothing"
    assert received == 200


@pytest.mark.parametrize("launcher", [True, False], ids=["lbapp", "uvicorn --ws"])
def test_sigterm_gives_open_sessions_1001_after_the_graceful_timeout(
    echo_factory: Any, launcher: bool
) -> None:
    backend = echo_factory("graceful")
    env = {"LB_BACKENDS": backend.url, "LB_HEALTH_INTERVAL": "60", "LB_GRACEFUL_TIMEOUT": "3"}
    if launcher:
        lb: LBProcess = LauncherProcess(env)
    else:
        protocol = "lbapp.wsserver:GracefulWebSocketProtocol"
        lb = LBProcess(env, "--ws", protocol, "--timeout-graceful-shutdown", "3")
    try:

        async def run() -> tuple[int, str]:
            async with connect(ws_url(lb, "/ws/graceful")) as ws:
                await ws.send("before")
                assert await ws.recv() == "before"
                lb.proc.send_signal(signal.SIGTERM)
                await ws.send("during the graceful time")  # the session still works...
                assert await ws.recv() == "during the graceful time"
                return await closed_by_peer(ws)  # ...until it is told the server goes away

        assert asyncio.run(run()) == (1001, "server shutting down")
        assert lb.proc.wait(timeout=20) in (0, -signal.SIGTERM)
    finally:
        lb.stop()
    closes = httpx.get(backend.url + "/ws-closes").json()
    assert {"path": "/ws/graceful", "code": 1001, "reason": "server shutting down"} in closes


def test_the_launcher_serves_websocket_with_the_relays_limit() -> None:
    settings = load_settings(websocket_max_message="32MiB")
    config = server_config(settings, build_parser().parse_args([]), create_app(settings))
    assert config.ws is GracefulWebSocketProtocol
    assert config.ws_max_size == 32 * MiB


# The page waits for an image its own server holds back until the page calls `/release`: the
# load event (when Chromium dumps the DOM) comes only after the WebSocket closed and the result was
# written (or after 30 s, when the server gives up).
PAGE = """<!doctype html><html><head><meta charset="utf-8"><link rel="icon" href="data:,"></head>
<body><pre id="out">waiting</pre><img src="/gate.gif" alt=""><script>
const out = document.getElementById("out");
const ws = new WebSocket("{ws}", ["echo.v1"]);
ws.binaryType = "arraybuffer";
const got = [];
ws.onopen = () => {{ ws.send("from chromium"); ws.send(new Uint8Array([1, 2, 3, 250]).buffer); }};
ws.onmessage = (event) => {{
  got.push(typeof event.data === "string" ? event.data : Array.from(new Uint8Array(event.data)).join(","));
  if (got.length === 2) ws.close(4000, "page done");
}};
ws.onclose = (event) => {{
  out.textContent = JSON.stringify({{protocol: ws.protocol, got: got, code: event.code}});
  fetch("/release");
}};
ws.onerror = () => {{ out.textContent = "error"; fetch("/release"); }};
</script></body></html>
"""
GIF = bytes.fromhex("47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b")


class PageServer:
    """Serves the page, the held-back image and the call that releases it."""

    def __init__(self, ws: str) -> None:
        self.page = PAGE.format(ws=ws).encode()
        self.released: asyncio.Event | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if self.released is None:
            self.released = asyncio.Event()
        body, kind = self.page, b"text/html; charset=utf-8"
        if scope["path"] == "/gate.gif":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.released.wait(), 30)
            body, kind = GIF, b"image/gif"
        elif scope["path"] == "/release":
            self.released.set()
            body, kind = b"released", b"text/plain"
        headers = [(b"content-type", kind), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def test_headless_chromium_opens_a_websocket_through_lbapp(echo_factory: Any) -> None:
    binary = needs("chromium")
    backend = echo_factory("browser")
    with (
        run_lb([backend.url]) as server,
        ThreadedServer(PageServer(ws_url(server, "/ws/from-browser"))) as pages,
    ):
        dom = chromium(binary, "--dump-dom", pages.url + "/page")
        assert dom.returncode == 0, dom.stderr[-2000:]
        text = dom.stdout.split('<pre id="out">')[1].split("</pre>")[0].replace("&quot;", '"')
        assert text.startswith("{"), dom.stdout[-2000:]
        result = json.loads(text)
        closes = wait_until(lambda: httpx.get(backend.url + "/ws-closes").json())
    assert result == {"protocol": "echo.v1", "got": ["from chromium", "1,2,3,250"], "code": 4000}
    assert {"path": "/ws/from-browser", "code": 4000, "reason": "page done"} in closes
