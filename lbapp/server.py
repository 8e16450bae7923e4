"""The client side of the front door: uvicorn's httptools protocol with a header timeout and limits.

uvicorn starts no timer on a fresh connection nor while a request head trickles in, and httptools
bounds neither a head's size nor its number of headers. The ASGI app is only called once a head is
complete, so these limits cannot live in the app; this protocol enforces them where the bytes
arrive (the launcher, lbapp/cli.py, passes it to uvicorn as `http=`):

- `LB_CLIENT_HEADER_TIMEOUT`: a request head must be complete this long after its first byte
  (for a connection's first request: after the connection opens, so a connection that sends
  nothing is timed out too). Past it: `408`, `Connection: close`. The idle time between two
  requests of a keep-alive connection stays uvicorn's keep-alive timeout (silent close).
- `LB_MAX_HEADER_SIZE` (request target and header fields) and `LB_MAX_HEADER_COUNT`: past either,
  `431`; the app never sees the request.

Every answer of the protocol's own (400, 408, 431) closes the connection after a short lingering
close (nginx's), so the client's unread bytes do not turn into a reset that destroys the answer.
With pipelined requests an answer waits until the responses to the requests before it are written.

Hot path: no task per request and one timer handle per connection at most. The timer is lazy: a
request sets a deadline (a float); the handle fires at most once per timeout period and re-arms
itself when the deadline has moved on.
"""

from __future__ import annotations

import asyncio
import http
import logging
from dataclasses import dataclass
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE
from uvicorn.server import ServerState

from .answers import http_date
from .cycle import CoalescingProtocol
from .server_settings import ServerSettings

logger = logging.getLogger("lbapp.server")

# After an answer of the protocol's own: how long the client's bytes are still read and dropped
# before the connection closes (it closes sooner when the client closes its side).
LINGER = 2.0
# A timer that fires this close to its deadline counts as on time (loops round timers to ~1 ms).
_SLACK = 0.005


@dataclass(frozen=True, slots=True)
class HeadLimits:
    """What a request head may take: seconds to arrive, bytes, header fields."""

    timeout: float = 10.0
    max_size: int = 32 * 1024
    max_count: int = 100

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> HeadLimits:
        return cls(settings.client_header_timeout, int(settings.max_header_size), settings.max_header_count)


class ServerConfig(uvicorn.Config):
    """uvicorn's Config plus the head limits; pickled into each worker with `--workers N`."""

    def __init__(self, app: Any, *, head_limits: HeadLimits, **options: Any) -> None:
        self.head_limits = head_limits
        super().__init__(app, **options)


class _Rejected(Exception):
    """Raised in a parser callback to stop httptools once the request has been answered."""


class HardenedHttpToolsProtocol(CoalescingProtocol):
    """HttpToolsProtocol with the head timeout (408) and the head size and count limits (431)."""

    # Slots, not instance-dict entries: uvicorn's protocol already holds ~28 attributes, and an
    # instance dict past CPython's shared-key limit (30) loses its fastest attribute access.
    __slots__ = (
        "ended_in_read",
        "head_bytes",
        "head_deadline",
        "head_timeout",
        "head_timer",
        "head_wire",
        "in_head",
        "in_message",
        "max_head_size",
        "max_header_count",
        "rejected",
    )

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        limits: HeadLimits = getattr(config, "head_limits", None) or HeadLimits()
        self.head_timeout = limits.timeout
        self.max_head_size = limits.max_size
        self.max_header_count = limits.max_count
        self.head_timer: asyncio.TimerHandle | None = None
        self.head_deadline = 0.0  # loop time by which the pending head must be complete; 0: none
        self.in_message = False  # between the first byte of a request and the end of its body
        self.in_head = False  # between the first byte of a request and the end of its head
        self.head_bytes = 0  # target and header fields of the head, as parsed
        self.head_wire = 0  # bytes received while the head is incomplete (see data_received)
        self.ended_in_read = False  # a message ended in the read being parsed
        self.rejected = 0  # status of the answer that ends this connection; 0: none

    # --- the head deadline -------------------------------------------------------------------

    def arm_head_timer(self) -> None:
        self.head_deadline = deadline = self.loop.time() + self.head_timeout
        if self.head_timer is None:
            self.head_timer = self.loop.call_at(deadline, self.on_head_timer)

    def on_head_timer(self) -> None:
        self.head_timer = None
        deadline = self.head_deadline
        if not deadline or self.rejected or self.transport.is_closing():
            return
        if deadline - self.loop.time() > _SLACK:  # a later head moved the deadline: wait for it
            self.head_timer = self.loop.call_at(deadline, self.on_head_timer)
            return
        logger.debug("408: no complete request head within %gs from %s", self.head_timeout, self.client)
        self.reject(408)

    # --- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        self.head_deadline = 0.0
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # uvicorn's data_received, with the head deadline and the head's byte count around the feed.
        if self.rejected:
            return  # answered and closing: the client's bytes are dropped, never parsed
        self._unset_keepalive_if_required()
        if (
            not self.in_message
            and not self.head_deadline
            and (self.cycle is None or self.cycle.response_complete)
        ):
            self.arm_head_timer()  # the first bytes of the next request: its head's clock starts
        self.ended_in_read = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            if not self.rejected:  # not a limit of ours that stopped the parser: bad syntax
                self.logger.warning("Invalid HTTP request received.")
                self.reject(400)
            return
        if self.in_head:
            # httptools buffers a header until it is complete: count what arrives meanwhile too.
            if self.head_wire == -1:  # the head began in this read, after another message's end
                self.head_wire = self.head_bytes  # count its parsed part only (a lower bound)
            elif self.head_wire == -2:  # the head began this read (after CRLFs at most)
                self.head_wire = len(data)
            else:
                self.head_wire += len(data)
            if self.head_wire > self.max_head_size:
                self.reject(431)

    def handle_websocket_upgrade(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        super().handle_websocket_upgrade()

    # --- parser callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.in_message = self.in_head = True
        self.head_bytes = 0
        self.head_wire = -1 if self.ended_in_read else -2

    def on_url(self, url: bytes) -> None:
        self.head_bytes += len(url)
        if self.head_bytes > self.max_head_size:
            self.reject(431)
            raise _Rejected
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + 4  # ": " and CRLF
        if self.head_bytes > self.max_head_size or len(self.headers) >= self.max_header_count:
            if self.in_head:
                self.reject(431)
            else:  # chunked trailers past the limits, the response under way: drop the connection
                self.rejected = 431
                self.transport.close()
            raise _Rejected
        # uvicorn's on_header, inlined (it runs once per header of every request).
        name = name.lower()
        value = value.rstrip(b" \t")  # trailing OWS is not part of the value (RFC 9110 §5.5)
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_deadline = 0.0
        if self.url[:1] != b"/" and self.url != b"*":  # absolute-form: its authority is the Host
            parsed = httptools.parse_url(self.url)  # (RFC 9112 §3.2.2); llhttp validated the URL
            if parsed.host:
                host = parsed.host + (b":%d" % parsed.port if parsed.port else b"")
                self.headers[:] = [*(h for h in self.headers if h[0] != b"host"), (b"host", host)]
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self.in_message = False
        self.ended_in_read = True
        super().on_message_complete()

    def on_response_complete(self) -> None:
        if self.rejected and not self.pipeline:
            # Every response before the rejected request is written: now its answer.
            self.server_state.total_requests += 1
            self.answer(self.rejected)
            return
        super().on_response_complete()
        if (
            self.in_head
            and not self.head_deadline
            and self.cycle.response_complete
            and not self.transport.is_closing()
        ):
            self.arm_head_timer()  # a pipelined head was waiting behind this response

    # --- answers of our own ------------------------------------------------------------------

    def reject(self, status: int) -> None:
        """End the connection with `status`, once the responses to earlier requests are written."""
        self.rejected = status
        self.head_deadline = 0.0
        cycle = self.cycle
        if self.in_message and not self.in_head and cycle is not None and not cycle.response_complete:
            # Bad bytes in the body of a request being answered: that exchange is over. Its app
            # sees a disconnect and its sends are dropped; the client gets the answer, or (with
            # a response already begun or queued behind) a close.
            cycle.disconnected = True
            cycle.message_event.set()
            if cycle.response_started or self.pipeline:
                self.transport.close()
            else:
                self.answer(status)
            return
        if self.pipeline or (cycle is not None and not cycle.response_complete):
            self.flow.pause_reading()  # on_response_complete answers when they are done
            return
        self.answer(status)

    def answer(self, status: int) -> None:
        """Write a short `status` answer, half-close, drop what the client still sends, close."""
        if self.transport.is_closing():
            return
        # The shape of lbapp's other answers (lbapp/answers.py): `{"error": "request timeout"}`.
        body = b'{"error": "%s"}' % http.HTTPStatus(status).phrase.lower().encode("ascii")
        head = (
            b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n"
            b"date: %s\r\n\r\n" % (len(body), http_date())
        )
        self.transport.write(STATUS_LINE[status] + head + body)
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.flow.resume_reading()
            self.head_timer = self.loop.call_later(LINGER, self.transport.close)
        else:
            self.transport.close()
