"""Rate limiting: a token bucket per route and client key, checked before a backend is chosen.

A bucket of `burst` tokens refills at `rate`; a request takes one token or is refused (429).
The bucket is kept in its GCRA form: one number, the time at which it will be full again
(`full_at`; at or before now means full). That makes a bucket one float in every store, a full
bucket indistinguishable from a missing one (so full buckets are simply dropped, and Redis
keys expire exactly when full), and the decision the same few float operations everywhere.

Stores (which one is chosen in `create_store`):
- `LocalStore`: one process; a dict bounded at `max_keys` buckets (full ones swept first, then
  those closest to full). Exact while fewer than `max_keys` clients hold a non-full bucket.
- `SharedStore`: several uvicorn workers of one instance; a fixed-size table in an `mmap`'d
  file (in `PROMETHEUS_MULTIPROC_DIR`, else in the temp dir under the supervisor's pid): sets
  of 16 slots chosen by key hash, each set guarded by an `fcntl` byte-range lock. Exact (the
  lock makes each read-decide-write atomic across workers) unless more than 16 clients with
  non-full buckets hash to one set; then the one closest to full is evicted and gets back at
  most the tokens it was owed (never more than `burst`).
- `redisstore.RedisStore`: several instances; one Lua script per request.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import ipaddress
import math
import mmap
import multiprocessing
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import lru_cache
from heapq import nsmallest
from typing import Any, Protocol

from .settings import SettingsError

Clock = Callable[[], float]
Headers = list[tuple[bytes, bytes]]

_RATE = re.compile(r"^\s*(\d+)\s*/\s*(s|m|h)\s*$")
_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
MAX_KEY_BYTES = 64  # longer header values are hashed: a key never holds more than this


def parse_rate(value: str) -> tuple[int, float]:
    """`10/s`, `600/m`, `1000/h` -> (requests, period in seconds)."""
    match = _RATE.match(value)
    if match is None or int(match.group(1)) < 1:
        raise ValueError("expected <n>/s, <n>/m or <n>/h with n >= 1, e.g. 10/s")
    return int(match.group(1)), _PERIODS[match.group(2)]


def check_key(value: str) -> str:
    """`ip` or `header:<Name>` (the name lower-cased)."""
    kind, sep, name = value.strip().partition(":")
    if kind.lower() == "ip" and not sep:
        return "ip"
    if kind.lower() == "header" and _TOKEN.match(name):
        return f"header:{name.lower()}"
    raise ValueError("expected ip or header:<Name>")


class Limit:
    """One limit: `requests` per `period` seconds, a bucket of `burst` (default: `requests`).

    `decide(full_at, now)` is the whole token bucket; every store calls it (the Redis script is
    its transcription). The policy header says the bucket holds `burst` and refills in `window`.
    """

    __slots__ = ("burst", "capacity", "epsilon", "interval", "policy", "window")

    def __init__(self, requests: int, period: float, burst: int | None = None) -> None:
        self.burst = burst if burst is not None else requests
        self.interval = period / requests  # seconds per token
        self.capacity = self.burst * self.interval  # seconds from empty to full
        self.epsilon = self.interval * 1e-9  # float sums of `interval` must not lose a token
        self.window = max(1, math.ceil(self.capacity - self.epsilon))
        self.policy = f'"default";q={self.burst};w={self.window}'.encode()

    @classmethod
    def parse(cls, rate: str, burst: int | None = None) -> Limit:
        return cls(*parse_rate(rate), burst)

    def decide(self, full_at: float, now: float) -> tuple[float | None, Decision]:
        """(the new `full_at`, or None when refused and unchanged; the decision)."""
        debt = full_at - now
        if debt < 0 or debt > self.capacity + self.epsilon:  # full, or a stale value: full
            debt = 0.0
        after = debt + self.interval
        if after > self.capacity + self.epsilon:
            return None, Decision(self, False, debt)
        return now + after, Decision(self, True, after)

    def __repr__(self) -> str:
        return f"Limit(burst={self.burst}, interval={self.interval:g}s)"


class Decision:
    """A limit's answer for one request; `debt` is how long until the bucket is full again.

    `error`: the store could not answer, and `allowed` is the fail policy (`LB_RATE_LIMIT_FAIL_OPEN`).
    """

    __slots__ = ("allowed", "debt", "error", "limit")

    def __init__(self, limit: Limit, allowed: bool, debt: float, error: bool = False) -> None:
        self.limit = limit
        self.allowed = allowed
        self.debt = debt
        self.error = error

    @property
    def remaining(self) -> int:
        limit = self.limit
        return max(0, int((limit.capacity - self.debt) / limit.interval + 1e-6))

    @property
    def retry_after(self) -> int:
        """Whole seconds (at least 1) until a token is there: `Retry-After` of a 429."""
        limit = self.limit
        wait = self.debt + limit.interval - limit.capacity
        return max(1, math.ceil(wait - limit.epsilon))

    def headers(self) -> Headers:
        """`RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers); on a refusal
        `t` is the `Retry-After` point (the draft: both name the same time) and `Retry-After`.
        Without an answer from the store only the policy is known."""
        if self.error:
            return [(b"ratelimit-policy", self.limit.policy)]
        if self.allowed:
            reset = max(1, math.ceil(self.debt - self.limit.epsilon))
            state = f'"default";r={self.remaining};t={reset}'.encode()
            return [(b"ratelimit-policy", self.limit.policy), (b"ratelimit", state)]
        wait = str(self.retry_after).encode()
        state = b'"default";r=0;t=' + wait
        return [(b"ratelimit-policy", self.limit.policy), (b"ratelimit", state), (b"retry-after", wait)]


class Store(Protocol):
    """Where buckets live: `take` one token of `limit` from the bucket named `key`."""

    async def take(self, key: str, limit: Limit) -> Decision: ...

    async def aclose(self) -> None: ...


class LocalStore:
    """Buckets of one process in a dict of at most `max_keys` (the event loop serialises access)."""

    def __init__(self, max_keys: int = 100_000, clock: Clock = time.monotonic) -> None:
        self.max_keys = max_keys
        self.clock = clock
        self.buckets: dict[str, float] = {}
        self.evicted = 0  # non-full buckets dropped to stay within max_keys

    def take_now(self, key: str, limit: Limit) -> Decision:
        buckets = self.buckets
        now = self.clock()
        full_at, decision = limit.decide(buckets.get(key, 0.0), now)
        if full_at is not None:
            if key not in buckets and len(buckets) >= self.max_keys:
                self._shrink(now)
            buckets[key] = full_at
        return decision

    async def take(self, key: str, limit: Limit) -> Decision:
        return self.take_now(key, limit)

    def _shrink(self, now: float) -> None:
        """Drop every full bucket; if that frees under a tenth, drop those closest to full too.

        A full bucket is the same as none, so dropping it changes nothing. Each call frees at
        least a tenth of the table, so its O(n) cost is spread over that many new keys.
        """
        buckets = self.buckets
        for key in [k for k, full_at in buckets.items() if full_at <= now]:
            del buckets[key]
        target = self.max_keys - max(1, self.max_keys // 10)
        excess = len(buckets) - target
        if excess > 0:
            for key, _ in nsmallest(excess, buckets.items(), key=lambda item: item[1]):
                del buckets[key]
            self.evicted += excess

    async def aclose(self) -> None:
        self.buckets.clear()


class SharedStore:
    """Buckets shared by the workers of one instance: a fixed table in an `mmap`'d file.

    Layout: a 64-byte header, then `sets` x `WAYS` slots of (u64 key hash, f64 full_at); hash 0
    is an empty slot. A set is read, decided and written under an `fcntl` lock on its own bytes,
    so workers serialise per set only. The file is sparse: only touched pages take memory.
    `time.monotonic` is one clock for every process of the machine; a value further ahead than
    the limit allows (another boot, another configuration) reads as a full bucket.
    """

    WAYS = 16
    SLOT = 16
    HEADER = 64
    MAGIC = b"lbapp-ratelimit-1"

    def __init__(self, path: str, max_keys: int = 100_000, clock: Clock = time.monotonic) -> None:
        self.sets = 1 << max(0, math.ceil(math.log2(max(1, max_keys) / self.WAYS)))
        self.path = path
        self.clock = clock
        self.evicted = 0
        size = self.HEADER + self.sets * self.WAYS * self.SLOT
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX, self.HEADER)  # one initialiser (the header's bytes)
            try:
                header = os.pread(self.fd, len(self.MAGIC) + 8, 0)
                geometry = self.MAGIC + self.sets.to_bytes(8, "little")
                if os.fstat(self.fd).st_size != size or header != geometry:
                    os.ftruncate(self.fd, 0)
                    os.ftruncate(self.fd, size)
                    os.pwrite(self.fd, geometry, 0)
            finally:
                fcntl.lockf(self.fd, fcntl.LOCK_UN, self.HEADER)
            self.map = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        table = memoryview(self.map)[self.HEADER :]
        self.hashes = table.cast("Q")  # slot i: hashes[2i] (and the float's bits at 2i + 1)
        self.times = table.cast("d")  # slot i: times[2i + 1]

    @staticmethod
    def key_hash(key: str) -> int:
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") or 1

    def take_now(self, key: str, limit: Limit) -> Decision:
        code = self.key_hash(key)
        ways = self.WAYS
        first = (code % self.sets) * ways * 2  # index of the set's first u64
        offset = self.HEADER + first * 8
        fcntl.lockf(self.fd, fcntl.LOCK_EX, ways * self.SLOT, offset)
        try:
            return self._take_locked(code, first, limit)
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, ways * self.SLOT, offset)

    def _take_locked(self, code: int, first: int, limit: Limit) -> Decision:
        now = self.clock()
        row = self.hashes[first : first + 2 * self.WAYS].tolist()[0::2]
        times = self.times
        try:
            slot = first + 2 * row.index(code)
            stored = times[slot + 1]
        except ValueError:
            slot, stored = -1, 0.0
        full_at, decision = limit.decide(stored, now)
        if full_at is None:
            return decision
        if slot < 0:
            slot = self._free_slot(first, now)
            self.hashes[slot] = code
        times[slot + 1] = full_at
        return decision

    def _free_slot(self, first: int, now: float) -> int:
        """An empty or full slot of the set; else the one closest to full (evicted)."""
        times = self.times
        best, best_at = first, math.inf
        for slot in range(first, first + 2 * self.WAYS, 2):
            at = times[slot + 1]
            if self.hashes[slot] == 0 or at <= now:
                return slot
            if at < best_at:
                best, best_at = slot, at
        self.evicted += 1
        return best

    async def take(self, key: str, limit: Limit) -> Decision:
        return self.take_now(key, limit)

    async def aclose(self) -> None:
        self.hashes.release()
        self.times.release()
        self.map.close()
        os.close(self.fd)


class KeyFunction:
    """The bucket key of a request: its client address (IPv6 by prefix) or a header's value."""

    def __init__(self, key: str = "ip", ipv6_prefix: int = 64) -> None:
        kind, _, name = key.partition(":")
        self.header = name.encode("latin-1") if kind == "header" else None
        self.ipv6_prefix = ipv6_prefix
        self.address = lru_cache(maxsize=4096)(self._address)

    def __call__(self, headers: Sequence[tuple[bytes, bytes]], client_ip: str) -> str:
        wanted = self.header
        if wanted is not None:
            for name, value in headers:
                if name == wanted:
                    value = value.strip()
                    if value:
                        if len(value) > MAX_KEY_BYTES:
                            value = hashlib.blake2b(value, digest_size=16).hexdigest().encode()
                        return "h:" + value.decode("latin-1")
                    break
        if ":" not in client_ip:
            return client_ip
        return self.address(client_ip)

    def _address(self, client_ip: str) -> str:
        """An IPv6 client by its network (`LB_RATE_LIMIT_IPV6_PREFIX`); IPv4-mapped as IPv4."""
        try:
            ip = ipaddress.IPv6Address(client_ip.partition("%")[0])
        except ValueError:
            return client_ip
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        network = ipaddress.IPv6Network((ip, self.ipv6_prefix), strict=False)
        return str(network)


class RateLimiter:
    """A route's limit, its key function and the store its buckets live in."""

    __slots__ = ("key", "limit", "route", "store")

    def __init__(self, route: str, limit: Limit, key: KeyFunction, store: Store) -> None:
        self.route = route
        self.limit = limit
        self.key = key
        self.store = store

    async def check(self, headers: Sequence[tuple[bytes, bytes]], client_ip: str) -> Decision:
        """Take a token (a store that cannot answer decides by its fail policy, `error` set)."""
        return await self.store.take(f"{self.route}\x00{self.key(headers, client_ip)}", self.limit)


def route_limit(settings: Any, spec: Any = None, where: str = "LB_ROUTES") -> Limit | None:
    """The limit of the default route (`spec` None) or of a routes-table entry: its own
    `rate_limit`/`rate_limit_burst` where given, else the top-level ones; None when off."""
    rate: str = settings.rate_limit
    burst: int | None = settings.rate_limit_burst
    if spec is not None:
        if spec.rate_limit is not None:
            rate, burst = spec.rate_limit, None
        if spec.rate_limit_burst is not None:
            if not rate:
                raise SettingsError(
                    f"invalid setting {where}.rate_limit_burst: needs a rate (rate_limit or LB_RATE_LIMIT)"
                )
            burst = spec.rate_limit_burst
    return Limit.parse(rate, burst) if rate else None


def create_store(settings: Any, multiproc_dir: str | None) -> Store:
    """Redis when configured; else, in a worker of `uvicorn --workers N`, the shared table
    (in `PROMETHEUS_MULTIPROC_DIR`, or the temp dir under the supervisor's pid); else a dict."""
    if settings.rate_limit_redis_url:
        from .redisstore import RedisStore

        return RedisStore(
            settings.rate_limit_redis_url,
            timeout=settings.rate_limit_redis_timeout,
            fail_open=settings.rate_limit_fail_open,
        )
    if multiproc_dir:
        os.makedirs(multiproc_dir, exist_ok=True)
        return SharedStore(os.path.join(multiproc_dir, TABLE_NAME), settings.rate_limit_max_keys)
    if multiprocessing.parent_process() is not None:  # a worker spawned by uvicorn's supervisor
        directory = tempfile.gettempdir()
        remove_stale_tables(directory)
        path = os.path.join(directory, f"lbapp-ratelimit-{os.getppid()}.table")
        return SharedStore(path, settings.rate_limit_max_keys)
    return LocalStore(settings.rate_limit_max_keys)


TABLE_NAME = "lbapp-ratelimit.table"


def remove_stale_tables(directory: str) -> None:
    """Tables in the temp dir whose supervisor is gone (one per earlier run)."""
    for path in glob.glob(os.path.join(directory, "lbapp-ratelimit-*.table")):
        pid = os.path.basename(path)[len("lbapp-ratelimit-") : -len(".table")]
        if pid.isdigit() and int(pid) != os.getppid() and not os.path.exists(f"/proc/{pid}"):
            with contextlib.suppress(OSError):
                os.remove(path)
