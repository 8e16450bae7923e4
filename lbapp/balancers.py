"""Balancing policies: each one small class with `pick(backends, request) -> Backend`.

Policies only ever see eligible backends (the pool filters them), and `backends` is never empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from .pool import Backend


class RequestInfo:
    """What a policy may look at: the ASGI scope and the resolved client address."""

    __slots__ = ("client_ip", "scope")

    def __init__(self, scope: dict[str, Any], client_ip: str) -> None:
        self.scope = scope
        self.client_ip = client_ip


class Balancer(Protocol):
    def pick(self, backends: Sequence[Backend], request: RequestInfo) -> Backend: ...


class RoundRobin:
    """Strict rotation over the eligible backends."""

    def __init__(self) -> None:
        self._next = 0

    def pick(self, backends: Sequence[Backend], request: RequestInfo) -> Backend:
        index = self._next % len(backends)
        self._next = index + 1
        return backends[index]


POLICIES: dict[str, type[Balancer]] = {
    "round_robin": RoundRobin,
}


def create_balancer(name: str) -> Balancer:
    try:
        return POLICIES[name]()
    except KeyError:
        known = ", ".join(sorted(POLICIES))
        raise ValueError(f"unknown algorithm {name!r} (known: {known})") from None
