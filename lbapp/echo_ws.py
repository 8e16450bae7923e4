"""The echo backend's WebSocket side (see echo.py): echoes messages, obeys `!commands`.

A mixin of `EchoApp`, apart so that echo.py stays one screenful per concern. It picks `echo.v2` or
`echo.v1` from the offered subprotocols; `/ws/close/CODE?reason=R` closes once accepted,
`/ws/refuse/STATUS` refuses with that status and a body; `!info`, `!close CODE REASON`,
`!flood N SIZE` and `!stall S` are commands; every close a client sends is kept in `ws_closes`.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

Scope = dict[str, Any]
SUBPROTOCOLS = ("echo.v2", "echo.v1")  # the echo backend's preference order


class WebSocketEcho:
    """`EchoApp`'s WebSocket handler; the attributes are `EchoApp`'s."""

    name: str
    fail: bool
    latency: float
    ws_closes: list[dict[str, Any]]

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
