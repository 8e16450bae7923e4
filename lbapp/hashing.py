"""Affinity policies: consistent hashing of a request key, client-address hashing, sticky cookies.

Hashes are blake2b, never Python's `hash()` (salted per process): every worker and every
restart maps a key to the same backend.
"""

from __future__ import annotations

import hashlib
import hmac
from base64 import urlsafe_b64encode
from bisect import bisect_right
from collections.abc import Callable, Sequence

from .backend import Backend
from .policy import Balancer, Headers, RequestInfo

# Virtual nodes per unit of weight: a backend's share of keys is within a few % of its fair share.
POINTS_PER_WEIGHT = 512
MAX_HASH_WEIGHT = 20  # weights above this count as this much on the ring (its size stays bounded)

KeyFunction = Callable[[RequestInfo], bytes | None]


def hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def key_function(spec: str) -> KeyFunction:
    """What to hash, from `LB_HASH_KEY`: `ip`, `path`, `header:<name>` or `cookie:<name>`.

    A request without the header or cookie gives None: the policy then hashes the client address.
    """
    kind, _, name = spec.partition(":")
    if kind == "ip":
        return lambda request: request.client_ip.encode()
    if kind == "path":
        return lambda request: request.scope.get("raw_path") or request.scope["path"].encode()
    if kind == "header":
        header = name.lower().encode("latin-1")
        return lambda request: request.header(header)
    if kind == "cookie":
        cookie = name
        return lambda request: next((v.encode() for v in request.cookies(cookie)), None)
    raise ValueError(f"unknown hash key {spec!r}")


class HashRing:
    """A consistent-hash ring over every backend it has been given, with virtual nodes.

    The ring keeps the points of backends that are currently not eligible and a lookup walks
    clockwise past them: that gives exactly the answer of a ring built without them, so taking a
    backend out moves only its own keys, and bringing it back moves exactly those keys back.
    """

    __slots__ = ("members", "owners", "points", "seen")

    def __init__(self) -> None:
        self.points: list[int] = []
        self.owners: list[Backend] = []
        self.members: set[Backend] = set()
        self.seen: Sequence[Backend] = ()

    def lookup(self, key: bytes, backends: Sequence[Backend]) -> Backend:
        """The owner of `key` among `backends` (a non-empty subset of what the ring holds)."""
        if backends is not self.seen:
            # A new eligible list (a pool change or a retry): add any backend not on the ring yet.
            self.seen = backends
            if not self.members.issuperset(backends):
                self._build(self.members.union(backends))
        points, owners = self.points, self.owners
        count = len(points)
        index = bisect_right(points, hash64(key))
        for step in range(count):
            owner = owners[(index + step) % count]
            if owner in backends:
                return owner
        raise LookupError("no backend of the list is on the ring")  # unreachable: all were added

    def _build(self, backends: set[Backend]) -> None:
        ring: list[tuple[int, str, int, Backend]] = []
        for backend in backends:
            name = backend.url
            replicas = POINTS_PER_WEIGHT * max(1, min(backend.weight, MAX_HASH_WEIGHT))
            for block in range(0, replicas, 8):  # one 64-byte digest gives eight 64-bit points
                digest = hashlib.blake2b(f"{name}#{block}".encode(), digest_size=64).digest()
                ring.extend(
                    (int.from_bytes(digest[i : i + 8], "big"), name, backend.index, backend)
                    for i in range(0, 64, 8)
                )
        ring.sort(key=lambda point: point[:3])
        self.points = [point[0] for point in ring]
        self.owners = [point[3] for point in ring]
        self.members = backends


class ConsistentHash:
    """Consistent hashing of a request key (`LB_HASH_KEY`) on a ring with virtual nodes.

    Without the key (no such header or cookie) the client address is hashed instead.
    """

    def __init__(self, key: str = "ip") -> None:
        self._key = key_function(key)
        self._ring = HashRing()

    def pick(self, backends: Sequence[Backend], request: RequestInfo) -> Backend:
        key = self._key(request)
        if key is None:
            key = request.client_ip.encode()
        return self._ring.lookup(key, backends)

    def forget(self, backend: Backend) -> None:
        # A ring rebuilt from the backends seen from now on gives every key the owner it had
        # among them (the lookup skips absent points either way); a weight change re-places it.
        self._ring = HashRing()


class IpHash(ConsistentHash):
    """The client address (after trusted-proxy resolution) hashed to a backend, consistently."""

    def __init__(self) -> None:
        super().__init__("ip")


class Sticky:
    """Cookie affinity: the first response sets an HMAC-signed cookie naming its backend.

    Later requests go to that backend while it is eligible; a missing, tampered or stale cookie
    (unknown or ineligible backend) is ignored: the fallback policy picks, and the response sets
    a new cookie. The cookie names a backend by a hash of its URL, so it does not reveal the URL,
    and stays valid across restarts (and workers) when the secret does.
    """

    def __init__(self, cookie: str, secret: bytes, fallback: Balancer) -> None:
        self.cookie = cookie
        self._secret = secret
        self._fallback = fallback
        self._values: dict[Backend, str] = {}  # backend -> its signed cookie value
        self._by_ident: dict[str, Backend] = {}

    def value(self, backend: Backend) -> str:
        value = self._values.get(backend)
        if value is None:
            ident = hashlib.blake2b(backend.url.encode(), digest_size=6).hexdigest()
            mac = hmac.new(self._secret, f"{self.cookie}={ident}".encode(), hashlib.sha256).digest()
            value = f"{ident}.{urlsafe_b64encode(mac[:16]).decode().rstrip('=')}"
            self._values[backend] = value
            self._by_ident[ident] = backend
        return value

    def pick(self, backends: Sequence[Backend], request: RequestInfo) -> Backend:
        if len(self._values) < len(backends):
            for backend in backends:
                self.value(backend)
        for value in request.cookies(self.cookie):
            named = self._by_ident.get(value.partition(".")[0])
            if named is not None and hmac.compare_digest(self._values[named], value) and named in backends:
                request.note = value
                return named
        return self._fallback.pick(backends, request)

    def forget(self, backend: Backend) -> None:
        value = self._values.pop(backend, None)
        if value is not None:
            self._by_ident.pop(value.partition(".")[0], None)
        hook = getattr(self._fallback, "forget", None)
        if hook is not None:
            hook(backend)

    def response_headers(self, backend: Backend, request: RequestInfo) -> Headers | None:
        value = self.value(backend)
        if request.note == value:
            return None
        cookie = f"{self.cookie}={value}; Path=/; HttpOnly; SameSite=Lax"
        if request.https:
            cookie += "; Secure"
        return [(b"set-cookie", cookie.encode())]
