"""The policy contract: what a balancing policy is given, and what it must answer.

A policy is one small class with `pick(backends, request) -> Backend`. It only ever sees the
eligible backends of its own pool (healthy, weight above 0, in configured order, below their
in-flight cap), and `backends` is never empty. Two optional methods let a policy learn and
answer; the cluster looks them up once, so a policy without them costs nothing:

- `observe(backend, seconds, ok)`: an attempt on `backend` ended after `seconds` (time to the
  response head), `ok` False when it failed without an answer.
- `response_headers(backend, request)`: headers to add to the client's response, or None.
- `forget(backend)`: `backend` left the pool or its weight changed (admin API, reload, DNS):
  drop whatever the policy keeps for it.

A policy with `standby = True` also sees healthy backends of weight 0 (only `first` does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from .backend import Backend

Headers = list[tuple[bytes, bytes]]


class RequestInfo:
    """What a policy may look at: the ASGI scope and the resolved client address.

    `note` is scratch space for the policy that picks for this request (sticky keeps the
    backend its cookie named there, to know whether the response must set a new one).
    """

    __slots__ = ("client_ip", "note", "scope", "trusted")

    def __init__(self, scope: dict[str, Any], client_ip: str, trusted: bool = False) -> None:
        self.scope = scope
        self.client_ip = client_ip
        self.trusted = trusted  # the peer is a trusted proxy: its X-Forwarded-Proto counts
        self.note: Any = None

    def header(self, name: bytes) -> bytes | None:
        """The first value of a request header (`name` in lower case)."""
        for key, value in self.scope["headers"]:
            if key == name:
                return bytes(value)
        return None

    def cookies(self, name: str) -> list[str]:
        """Every value the client sent for cookie `name` (there may be several)."""
        found = []
        for key, value in self.scope["headers"]:
            if key == b"cookie":
                for pair in value.decode("latin-1").split(";"):
                    cookie, sep, text = pair.strip().partition("=")
                    if sep and cookie == name:
                        found.append(text.strip().strip('"'))
        return found

    @property
    def https(self) -> bool:
        """The client talks https to us, or (trusted proxy only) to the proxy in front."""
        if self.scope.get("scheme") == "https":
            return True
        proto = self.header(b"x-forwarded-proto") if self.trusted else None
        return proto is not None and proto.split(b",")[0].strip().lower() == b"https"


class Balancer(Protocol):
    def pick(self, backends: Sequence[Backend], request: RequestInfo) -> Backend: ...
