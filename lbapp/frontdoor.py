"""The front door: what one client may cost, what lbapp refuses to forward, and the path it routes on.

`FrontDoor` holds the limits on a client's request that the app enforces (body timeout, body size,
request buffering, requests in flight; the head's timeout and size are the server protocol's, see
server.py). nginx's rules where RFC 9112 leaves a choice: a request with no `Host` (HTTP/1.1), several, or one
that is not a `host[:port]` gets 400, since a backend choosing by `Host` and lbapp choosing by
route could otherwise disagree about the request (and caches about the URL); `TRACE` is refused
(405) unless allowed, since it echoes headers such as cookies back to a script; a path whose dot
segments climb above the root gets 400. Routes match the dot-segment-normalised path, so
`/api/../admin` is routed as `/admin`; the target forwarded stays byte-exact.
"""

from __future__ import annotations

import re
from typing import Any

from .answers import BAD_HOST, BODY_TIMEOUT, TOO_LARGE, TRACE_NOT_ALLOWED, Answer
from .headers import RequestHead
from .streaming import BodyTimeout, BodyTooLarge, ClientError

# A client's body that stalled (408) or grew too large (413); one that went away gets nothing (499).
CLIENT_ERRORS: dict[type[ClientError], Answer] = {BodyTimeout: BODY_TIMEOUT, BodyTooLarge: TOO_LARGE}
# RFC 9110 §7.2 / RFC 3986 §3.2.2: reg-name (percent-encoding and sub-delims included), IPv4, or
# an IP literal in brackets; an optional port of up to five digits.
_HOST = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]+)(:[0-9]{0,5})?")


HOSTS_KEPT = 256


class FrontDoor:
    """What one client may cost: the limits `prepare` and the body enforce (README, Security)."""

    __slots__ = ("allow_trace", "body_timeout", "good_hosts", "max_body", "max_in_flight", "request_buffer")

    def __init__(
        self,
        body_timeout: float | None = 30.0,
        request_buffer: int = 64 * 1024,
        max_body: int = 0,
        max_in_flight: int = 0,
        allow_trace: bool = False,
    ) -> None:
        self.body_timeout = body_timeout
        self.request_buffer = request_buffer
        self.max_body = max_body
        self.max_in_flight = max_in_flight
        self.allow_trace = allow_trace
        self.good_hosts: set[bytes] = set()  # `Host` values that passed the check (a few hundred kept)

    def refusal(self, scope: dict[str, Any], head: RequestHead) -> Answer | None:
        """The answer for a request lbapp will not forward, or None."""
        if head.host_count != 1:
            if head.host_count > 1 or scope.get("http_version") != "1.0":
                return BAD_HOST
        elif head.host not in self.good_hosts:
            if _HOST.fullmatch(head.host) is None:
                return BAD_HOST
            if len(self.good_hosts) < HOSTS_KEPT:
                self.good_hosts.add(head.host)
        if scope["method"] == "TRACE" and not self.allow_trace:
            return TRACE_NOT_ALLOWED
        if self.max_body and head.content_length is not None and head.content_length > self.max_body:
            return TOO_LARGE
        return None


def normalize(path: bytes) -> bytes | None:
    """RFC 3986 §5.2.4 remove_dot_segments on a raw path (`%2e` counts as a dot); None when the
    path climbs above the root. Paths without dots come back as they are, at no cost."""
    if b"." not in path and b"%2" not in path:
        return path
    segments = path.split(b"/")
    out: list[bytes] = []
    for index, segment in enumerate(segments[1:], 1):
        plain = segment.lower().replace(b"%2e", b".")
        last = index == len(segments) - 1
        if plain == b".":
            if last:
                out.append(b"")
        elif plain == b"..":
            if not out or out == [b""]:
                return None
            out.pop()
            if last:
                out.append(b"")
        else:
            out.append(segment)
    return b"/" + b"/".join(out)
