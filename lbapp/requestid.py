"""X-Request-ID: kept when the client sends a sane one, generated otherwise.

The id is put into the request's header list (so the backend gets it) and returned for the
response (see `observe.Tap`). Sane: 1-128 characters of letters, digits and `-_.:+/=@`, which
covers UUIDs, hex, base64 and the ids of common tracers, and keeps log lines unambiguous.
"""

from __future__ import annotations

import os
import re
from typing import Any

HEADER = b"x-request-id"
MAX_LENGTH = 128
_SANE = re.compile(rb"[A-Za-z0-9\-_.:+/=@]{1,%d}" % MAX_LENGTH)


def is_sane(value: bytes) -> bool:
    return _SANE.fullmatch(value) is not None


class IdSource:
    """32 hex characters: 64 random bits drawn once per process, then a 64-bit counter.

    Unique per process (and, by the random half, across processes and restarts) without a
    getrandom() system call per request; an id is a log correlation key, not a secret.
    """

    __slots__ = ("count", "prefix")

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self.prefix = os.urandom(8).hex().encode("ascii")
        self.count = 0

    def __call__(self) -> bytes:
        self.count += 1
        return b"%s%016x" % (self.prefix, self.count)


generate = IdSource()
os.register_at_fork(after_in_child=generate.reseed)  # a forked worker must not repeat its parent's ids


def ensure_request_id(scope: dict[str, Any]) -> bytes:
    """The request's id; rewrites `scope["headers"]` when the client's one is missing or unusable.

    Exactly one sane `X-Request-ID` is kept as sent; none, several or an insane one are replaced
    by one generated id, so the backend and the client always see exactly one.
    """
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    found: bytes | None = None
    count = 0
    for name, value in headers:
        if len(name) == 12 and name.lower() == HEADER:
            found = value
            count += 1
    if count == 1 and found is not None and is_sane(found):
        return found
    request_id = generate()
    kept = [(n, v) for n, v in headers if n.lower() != HEADER] if count else list(headers)
    kept.append((HEADER, request_id))
    scope["headers"] = kept
    return request_id
