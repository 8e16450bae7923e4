"""The response side of the launcher's protocol: a response head goes out with its first body part.

uvicorn's `RequestResponseCycle.send` writes the head of a response the moment the app sends
`http.response.start`, and the body with the next message: two system calls (and two TCP segments)
for every small response, where one does. `ResponseCycle` holds the encoded head until the first
`http.response.body` message and writes both at once; so that a response whose body is slow to come
(a backend that streams, or sends its head early) still shows its head at once, a `call_soon`
flushes a head still held on the event loop's next turn. It also validates headers more cheaply than
uvicorn's two regular expressions per header (names checked once and remembered, values in one
pass over the block), accepting exactly what uvicorn accepts.

`CoalescingProtocol` is uvicorn's `HttpToolsProtocol` starting its cycles as `ResponseCycle`
(`on_headers_complete` is uvicorn 0.55's, with only the class replaced). Request bodies are kept
as the pieces the parser gave (uvicorn copies each twice), the keep-alive timeout is one lazy timer
per connection, and the cycle's event is bound to its loop. Flow control, pipelining and the 500
of a failing app are uvicorn's.
"""

from __future__ import annotations

import asyncio
import re
import urllib.parse
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT, service_unavailable
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

# uvicorn's rules: a header name has none of these (HEADER_RE) ...
_BAD_NAME = re.compile(b'[\x00-\x1f\x7f()<>@,;:\\[\\]={} \t\\\\"]')
# ... and a value only these bytes (no control character but tab: HEADER_VALUE_RE).
_VALUE_BYTES = bytes(b for b in range(256) if b == 0x09 or (b >= 0x20 and b != 0x7F))
NAMES_KEPT = 1024  # header names checked once and remembered (a backend's are few)
IDLE_SLACK = 0.005  # a timer this close to its deadline counts as on time (loops round to ~1 ms)
# A body part at most this big is copied behind the head (one write); a bigger one goes in its own.
COPY_LIMIT = 64 * 1024


class LoopEvent(asyncio.Event):
    """An `asyncio.Event` bound to its loop when made: Python 3.11's looks the running loop up
    (a getpid() system call) at every `wait`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.bound_loop = loop

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        return self.bound_loop


class ResponseCycle(RequestResponseCycle):
    """uvicorn's cycle, holding the response head until the first body part (module docstring),
    and keeping the request body's pieces as they came (uvicorn copies each into a bytearray,
    then copies that again for `receive`)."""

    held: bytes | None = None
    valid_names: ClassVar[set[bytes]] = set()  # header names that passed uvicorn's rule

    def __init__(self, loop: asyncio.AbstractEventLoop, **options: Any) -> None:
        super().__init__(**options)
        self.loop = loop
        self.parts: list[bytes] = []  # body pieces not yet received by the app
        self.buffered = 0

    async def receive(self) -> Any:
        # uvicorn 0.55's, with the body's pieces handed over as they are (joined only if several).
        if self.waiting_for_100_continue and not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.waiting_for_100_continue = False
        if not self.disconnected and not self.response_complete:
            self.flow.resume_reading()
            await self.message_event.wait()
            self.message_event.clear()
        if self.disconnected or self.response_complete:
            return {"type": "http.disconnect"}
        parts = self.parts
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        self.parts, self.buffered = [], 0
        return {"type": "http.request", "body": body, "more_body": self.more_body}

    async def send(self, message: Any) -> None:
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        kind = message["type"]
        if not self.response_started:
            if kind != "http.response.start":
                raise RuntimeError(f"Expected ASGI message 'http.response.start', but got '{kind}'.")
            self.response_started = True
            self.waiting_for_100_continue = False
            status = message["status"]
            if self.access_log:
                self.access_logger.info(
                    '%s - "%s %s HTTP/%s" %d',
                    get_client_addr(self.scope),
                    self.scope["method"],
                    get_path_with_query_string(self.scope),
                    self.scope["http_version"],
                    status,
                )
            self.held = self.encode_head(status, message.get("headers", ()))
            self.loop.call_soon(self.flush)
            return
        if self.response_complete:
            raise RuntimeError(f"Unexpected ASGI message '{kind}' sent, after response already completed.")
        if kind != "http.response.body":
            raise RuntimeError(f"Expected ASGI message 'http.response.body', but got '{kind}'.")
        body: bytes = message.get("body", b"")
        more_body = message.get("more_body", False)
        if self.scope["method"] == "HEAD":
            self.expected_content_length = 0
            data = b""
        elif self.chunked_encoding:
            data = b"%x\r\n%b\r\n" % (len(body), body) if body else b""
            if not more_body:
                data += b"0\r\n\r\n"
        else:
            if len(body) > self.expected_content_length:
                raise RuntimeError("Response content longer than Content-Length")
            self.expected_content_length -= len(body)
            data = body
        head = self.held
        if head is not None:
            self.held = None
            if len(data) <= COPY_LIMIT:
                data = head + data
            else:
                self.transport.write(head)
        if data:
            self.transport.write(data)
        if not more_body:
            if self.expected_content_length != 0:
                raise RuntimeError("Response content shorter than Content-Length")
            self.response_complete = True
            self.message_event.set()
            if not self.keep_alive:
                self.transport.close()
            self.on_response()

    def flush(self) -> None:
        """The event loop's next turn: a head still held goes out alone."""
        head = self.held
        if head is not None:
            self.held = None
            if not self.disconnected:
                self.transport.write(head)

    def encode_head(self, status: int, raw: Any) -> bytes:
        """uvicorn's head encoding: framing read from the headers, `connection: close` and
        `transfer-encoding: chunked` added as needed."""
        headers = [*self.default_headers, *raw] if self.default_headers else raw
        content: list[bytes] = []
        has_connection_close = False
        lines = len(headers)
        valid = self.valid_names
        for name, value in headers:
            if name not in valid:  # remembered names are lower-case and valid: most are
                name = name.lower()
                if name not in valid:
                    if not name or _BAD_NAME.search(name):
                        raise RuntimeError("Invalid HTTP header name.")
                    if len(valid) < NAMES_KEPT:
                        valid.add(name)
            if name == b"content-length" and self.chunked_encoding is None:
                self.expected_content_length = int(value.decode())
                self.chunked_encoding = False
            elif name == b"transfer-encoding" and value.lower() == b"chunked":
                self.expected_content_length = 0
                self.chunked_encoding = True
            elif name == b"connection" and b"close" in [t.lower().strip() for t in value.split(b",")]:
                self.keep_alive = False
                has_connection_close = True
            content += (name, b": ", value, b"\r\n")
        if not self.keep_alive and not has_connection_close:
            content.append(b"connection: close\r\n")
            lines += 1
        if self.chunked_encoding is None and self.scope["method"] != "HEAD" and status not in (204, 304):
            self.chunked_encoding = True
            content.append(b"transfer-encoding: chunked\r\n")
            lines += 1
        block = b"".join(content)
        # Every control character left once the value bytes are deleted: only the line ends.
        if block.translate(None, _VALUE_BYTES) != b"\r\n" * lines:
            raise RuntimeError("Invalid HTTP header value.")
        return STATUS_LINE[status] + block + b"\r\n"


class CoalescingProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol whose requests are served by `ResponseCycle`, and whose
    keep-alive timeout is one lazy timer per connection instead of a timer handle per response."""

    __slots__ = ("idle_deadline",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.idle_deadline = 0.0  # loop time when the idle connection closes; 0: not idle

    # --- keep-alive: uvicorn arms a timer per response and cancels it at the next request ---------

    def _unset_keepalive_if_required(self) -> None:
        self.idle_deadline = 0.0  # a pending timer sees this and stands down

    def on_response_complete(self) -> None:
        # uvicorn 0.55's, with the keep-alive timeout armed lazily.
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.idle_deadline = 0.0
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self.idle_deadline = deadline = self.loop.time() + self.timeout_keep_alive
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_at(deadline, self.on_idle_timer)

    def on_idle_timer(self) -> None:
        self.timeout_keep_alive_task = None
        deadline = self.idle_deadline
        if not deadline or self.transport.is_closing():
            return
        if deadline - self.loop.time() > IDLE_SLACK:  # used since: wait for the later deadline
            self.timeout_keep_alive_task = self.loop.call_at(deadline, self.on_idle_timer)
            return
        self.timeout_keep_alive_handler()

    def on_body(self, body: bytes) -> None:
        # uvicorn 0.55's, keeping the piece instead of copying it into a bytearray.
        cycle = self.cycle
        if (self.parser.should_upgrade() and self._should_upgrade()) or cycle.response_complete:
            return
        assert isinstance(cycle, ResponseCycle)
        cycle.parts.append(body)
        cycle.buffered += len(body)
        if cycle.buffered > HIGH_WATER_LIMIT:
            self.flow.pause_reading()
        cycle.message_event.set()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None

    def on_headers_complete(self) -> None:
        # uvicorn 0.55's HttpToolsProtocol.on_headers_complete; only the cycle's class differs.
        http_version = self.parser.get_http_version()
        method = self.parser.get_method()
        self.scope["method"] = method.decode("ascii")
        if http_version != "1.1":
            self.scope["http_version"] = http_version
        if self.parser.should_upgrade() and self._should_upgrade():
            return
        parsed_url = httptools.parse_url(self.url)
        raw_path = parsed_url.path
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        self.scope["path"] = self.root_path + path
        self.scope["raw_path"] = self.root_path.encode("ascii") + raw_path
        self.scope["query_string"] = parsed_url.query or b""
        if self.limit_concurrency is not None and (
            len(self.connections) >= self.limit_concurrency or len(self.tasks) >= self.limit_concurrency
        ):
            app = service_unavailable
            self.logger.warning("Exceeded concurrency limit.")
        else:
            app = self.app
        existing_cycle = self.cycle
        self.cycle = ResponseCycle(
            self.loop,
            scope=self.scope,
            transport=self.transport,
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=self.access_log,
            default_headers=self.server_state.default_headers,
            message_event=LoopEvent(self.loop),
            expect_100_continue=self.expect_100_continue,
            keep_alive=http_version != "1.0" and self.parser.should_keep_alive(),
            on_response=self.on_response_complete,
        )
        if existing_cycle is None or existing_cycle.response_complete:
            self._start_asgi_task(self.cycle, app)
        else:  # pipelined requests wait for the responses before them
            self.flow.pause_reading()
            self.pipeline.appendleft((self.cycle, app))
