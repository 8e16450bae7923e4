"""An echo backend for demos and tests: a real uvicorn server that describes what it received.

    python -m lbapp.echo --port 3001 --name backend-1 [--fail] [--latency 0.2]

Every path answers JSON `{"server", "method", "path", "query", "headers", "body_bytes"}`.
Test helpers: `/health`; `/bytes/N` streams N bytes; `/status/N` answers status N;
`/cookies` sets two cookies; `/redirect` answers 302; `/gzip` answers a gzip-encoded body;
`/truncate/N` promises 2N bytes, sends N and dies; `/sleep/S` waits S seconds before answering;
`/sse/ID` sends one server-sent event, the rest once `/sse-release/ID` is called (streaming test).
WebSocket (any path) echoes text and binary; picks `echo.v2` or `echo.v1` from the offered
subprotocols; obeys `!info` (handshake as JSON), `!close CODE REASON`, `!flood N SIZE`, `!stall S`;
`/ws/close/CODE?reason=R` closes once accepted; `/ws/refuse/STATUS` refuses with that status and
a body; `GET /ws-closes` lists the close codes and reasons clients sent.
`--fail` makes every answer (health included) a 500; `--latency` delays every answer;
`--flap` makes every other `/health` answer a 500; `--id-log FILE` appends `METHOD ID` for every
request carrying an `X-Request-ID`, written before the answer, so the record survives a SIGKILL
and several processes (or restarts) can share the file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import hashlib
import json
import os
import socket
from typing import Any

import uvicorn

Scope = dict[str, Any]
CHUNK = b"x" * 65536
SUBPROTOCOLS = ("echo.v2", "echo.v1")  # the echo backend's preference order


class EchoApp:
    """A raw ASGI app: cheap enough that it never becomes the bottleneck of a benchmark."""

    def __init__(
        self,
        name: str,
        fail: bool = False,
        latency: float = 0.0,
        flap: bool = False,
        id_log: str | None = None,
    ) -> None:
        self.name = name
        self.fail = fail
        self.latency = latency
        self.flap = flap
        self.health_checks = 0
        self.request_ids: dict[str, int] = {}
        self.ws_closes: list[dict[str, Any]] = []  # close frames received from WebSocket clients
        self.sse_gates: dict[str, asyncio.Event] = {}
        self.id_log = os.open(id_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if id_log else None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            return
        body_bytes = 0
        digest = hashlib.sha256()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body_bytes += len(message.get("body", b""))
            digest.update(message.get("body", b""))
            if not message.get("more_body", False):
                break
        if self.latency:
            await asyncio.sleep(self.latency)
        path: str = scope["path"]
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        request_id = dict(headers).get("x-request-id")
        seen = 0
        if request_id:
            seen = self.request_ids[request_id] = self.request_ids.get(request_id, 0) + 1
            if self.id_log is not None:  # one small O_APPEND write: atomic, survives SIGKILL
                os.write(self.id_log, f"{scope['method']} {request_id}\n".encode("latin-1"))
        if self.fail:
            await self._send(send, 500, json.dumps({"server": self.name, "error": "failing"}).encode())
            return
        if path == "/health":
            self.health_checks += 1
            if self.flap and self.health_checks % 2 == 0:
                await self._send(send, 500, b'{"status": "flapping"}')
                return
            await self._send(send, 200, b'{"status": "ok"}')
            return
        special = await self._special(path, send)
        if special:
            return
        document = {
            "server": self.name,
            "method": scope["method"],
            "path": path,
            "raw_path": (scope.get("raw_path") or b"").decode("latin-1"),
            "query": scope["query_string"].decode("latin-1"),
            "headers": dict(headers),
            "header_list": headers,
            "body_bytes": body_bytes,
            "body_sha256": digest.hexdigest(),
            "request_id_seen": seen,
        }
        await self._send(send, 200, json.dumps(document).encode())

    async def _special(self, path: str, send: Any) -> bool:
        """The test helpers; returns False for ordinary paths."""
        parts = path.strip("/").split("/")
        head, arg = parts[0], parts[1] if len(parts) > 1 else ""
        if head == "bytes" and arg.isdigit():
            await self._stream(send, int(arg))
        elif head == "status" and arg.isdigit():
            status = int(arg)
            await self._send(send, status, b"" if status in (204, 304) else b"status\n")
        elif head == "cookies":
            extra = [(b"set-cookie", b"a=1; Path=/"), (b"set-cookie", b"b=2; Path=/")]
            await self._send(send, 200, b"cookies\n", extra)
        elif head == "redirect":
            await self._send(send, 302, b"", [(b"location", b"/elsewhere")])
        elif head == "gzip":
            await self._send(send, 200, gzip.compress(b"hello " * 100), [(b"content-encoding", b"gzip")])
        elif head == "truncate" and arg.isdigit():
            length = int(arg)
            start = {"type": "http.response.start", "status": 200}
            start["headers"] = [(b"content-length", str(2 * length).encode())]
            await send(start)
            await send({"type": "http.response.body", "body": b"x" * length, "more_body": True})
            return True  # returning mid-response makes uvicorn close the connection
        elif head == "ws-closes":
            await self._send(send, 200, json.dumps(self.ws_closes).encode())
        elif head == "sse" and arg:
            await self._sse(send, arg)
        elif head == "sse-release" and arg:
            self.sse_gates.setdefault(arg, asyncio.Event()).set()
            await self._send(send, 200, b"released\n")
        elif head == "sleep":
            await asyncio.sleep(float(arg or 1))
            await self._send(send, 200, b"slept\n")
        else:
            return False
        return True

    async def _send(self, send: Any, status: int, body: bytes, extra: list[Any] | None = None) -> None:
        headers = [
            (b"content-type", b"application/json"),
            (b"x-backend", self.name.encode()),
        ]
        if status not in (204, 304):
            headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
        await send({"type": "http.response.body", "body": body})

    async def _stream(self, send: Any, size: int) -> None:
        headers = [(b"content-type", b"application/octet-stream"), (b"content-length", str(size).encode())]
        headers.append((b"x-backend", self.name.encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        remaining = size
        while remaining > 0:
            chunk = CHUNK if remaining >= len(CHUNK) else CHUNK[:remaining]
            remaining -= len(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": remaining > 0})
        if size == 0:
            await send({"type": "http.response.body", "body": b""})

    async def _sse(self, send: Any, gate_id: str) -> None:
        """One event, then wait (at most 30 s) for `/sse-release/ID`, then two more events."""
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"id: 1\ndata: first\n\n", "more_body": True})
        gate = self.sse_gates.setdefault(gate_id, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(gate.wait(), 30)
        self.sse_gates.pop(gate_id, None)
        await send({"type": "http.response.body", "body": b"id: 2\ndata: second\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"id: 3\ndata: third\n\n"})

    async def _websocket(self, scope: Scope, receive: Any, send: Any) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        if self.latency:
            await asyncio.sleep(self.latency)
        parts = scope["path"].strip("/").split("/")
        helper, arg = (parts[1], parts[2]) if len(parts) > 2 and parts[0] == "ws" else ("", "")
        name = self.name.encode()
        if self.fail or (helper == "refuse" and arg.isdigit()):
            status = 500 if self.fail else int(arg)
            body = json.dumps({"server": self.name, "error": "refused"}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            headers.append((b"x-backend", name))
            if status == 401:
                headers.append((b"www-authenticate", b'Bearer realm="echo"'))
            await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body})
            return
        offered = scope.get("subprotocols") or []
        chosen = next((p for p in SUBPROTOCOLS if p in offered), None)
        accept: dict[str, Any] = {"type": "websocket.accept", "headers": [(b"x-backend", name)]}
        if chosen is not None:
            accept["subprotocol"] = chosen
        await send(accept)
        if helper == "close" and arg.isdigit():
            query = dict(p.partition("=")[::2] for p in scope["query_string"].decode().split("&") if p)
            await send({"type": "websocket.close", "code": int(arg), "reason": query.get("reason", "")})
            return
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                closed = {"code": message.get("code"), "reason": message.get("reason") or ""}
                self.ws_closes.append({"path": scope["path"], **closed})
                return
            text = message.get("text")
            if text is None:
                await send({"type": "websocket.send", "bytes": message.get("bytes") or b""})
            elif text.startswith("!"):
                if await self._command(scope, send, text, chosen):
                    return
            else:
                await send({"type": "websocket.send", "text": text})

    async def _command(self, scope: Scope, send: Any, text: str, subprotocol: str | None) -> bool:
        """A `!command` message; True when it closed the session."""
        words = text[1:].split(" ", 2)
        if words[0] == "info":
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
            document = {
                "server": self.name,
                "path": scope["path"],
                "raw_path": (scope.get("raw_path") or b"").decode("latin-1"),
                "query": scope["query_string"].decode("latin-1"),
                "headers": dict(headers),
                "header_list": headers,
                "subprotocol": subprotocol,
            }
            await send({"type": "websocket.send", "text": json.dumps(document)})
        elif words[0] == "close" and len(words) > 1 and words[1].isdigit():
            reason = words[2] if len(words) > 2 else ""
            await send({"type": "websocket.close", "code": int(words[1]), "reason": reason})
            return True
        elif words[0] == "stall" and len(words) > 1:  # stop reading: lets the client's sends back up
            await asyncio.sleep(float(words[1]))
        elif words[0] == "flood" and len(words) > 2 and words[1].isdigit() and words[2].isdigit():
            payload = os.urandom(int(words[2]))  # incompressible: what crosses the wire is its size
            for _ in range(int(words[1])):
                await send({"type": "websocket.send", "bytes": payload})
        else:
            await send({"type": "websocket.send", "text": text})
        return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lbapp.echo", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3001)
    parser.add_argument("--fd", type=int, default=None, help="serve on an inherited listening socket")
    parser.add_argument("--name", default=None, help="reported as 'server' (default: backend-PORT)")
    parser.add_argument("--fail", action="store_true", help="answer 500 to everything, health included")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds to wait before each answer")
    parser.add_argument("--flap", action="store_true", help="answer every other /health with 500")
    parser.add_argument("--id-log", default=None, help="append 'METHOD X-Request-ID' lines to this file")
    args = parser.parse_args(argv)
    port = args.port
    if args.fd is not None:
        port = socket.socket(fileno=os.dup(args.fd)).getsockname()[1]
    app = EchoApp(
        args.name or f"backend-{port}",
        fail=args.fail,
        latency=args.latency,
        flap=args.flap,
        id_log=args.id_log,
    )
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        fd=args.fd,
        log_level="warning",
        access_log=False,
        server_header=False,
        lifespan="off",
        timeout_graceful_shutdown=1,  # a demo backend: do not wait long for slow requests
    )
    print(f"echo {app.name} listening on {args.host}:{port}", flush=True)
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
