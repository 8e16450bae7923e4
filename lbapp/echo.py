"""An echo backend for demos and tests: a real uvicorn server that describes what it received.

    python -m lbapp.echo --port 3001 --name backend-1 [--fail] [--latency 0.2]

Every path answers JSON `{"server", "method", "path", "query", "headers", "body_bytes"}`.
Test helpers: `/health`; `/bytes/N` streams N bytes; `/status/N` answers status N;
`/cookies` sets two cookies; `/redirect` answers 302; `/gzip` answers a gzip-encoded body;
`/truncate/N` promises 2N bytes, sends N and dies; `/sleep/S` waits S seconds before answering.
`--fail` makes every answer (health included) a 500; `--latency` delays every answer;
`--flap` makes every other `/health` answer a 500; `--id-log FILE` appends `METHOD ID` for every
request carrying an `X-Request-ID`, written before the answer, so the record survives a SIGKILL
and several processes (or restarts) can share the file.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import hashlib
import json
import os
import socket
from typing import Any

import uvicorn

Scope = dict[str, Any]
CHUNK = b"x" * 65536


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
        self.id_log = os.open(id_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if id_log else None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
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
