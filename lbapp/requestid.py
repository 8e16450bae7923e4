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


def generate() -> bytes:
    """128 random bits as 32 hex characters (as a UUID4 without dashes, at a third of the cost)."""
    return os.urandom(16).hex().encode("ascii")


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
