"""Rate limiting: a token bucket per route and client key, checked before a backend is chosen.

A bucket of `burst` tokens refills at `rate`; a request takes one token or is refused (429).
The bucket is kept in its GCRA form: one number, the time at which it will be full again
(`full_at`; at or before now means full). That makes a bucket one float in every store, a full
bucket indistinguishable from a missing one (so full buckets are simply dropped, and Redis
keys expire exactly when full), and the decision the same few float operations everywhere
(`Limit.decide`). Where buckets live: limitstores.py (one process, the workers of one
instance) and redisstore.py (every instance). A route's `RateLimiter` is on its `Cluster`;
the proxy calls `admit` once per request of a limited route, before choosing a backend.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import re
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any, Protocol
from urllib.parse import urlsplit

from .answers import Answer, json_error
from .config import SettingsError

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


def check_rate(value: Any) -> Any:
    """A setting's rate: `<n>/s|m|h` normalised, `""` for empty or `off` (no limit), None kept."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("expected <n>/s, <n>/m or <n>/h, e.g. 10/s (or off)")
    value = value.strip().lower()
    if value in ("", "off"):
        return ""
    parse_rate(value)
    return value.replace(" ", "")


def none_if_empty(value: Any) -> Any:
    return None if isinstance(value, str) and not value.strip() else value


def check_key(value: str) -> str:
    """`ip` or `header:<Name>` (the name lower-cased)."""
    kind, sep, name = value.strip().partition(":")
    if kind.lower() == "ip" and not sep:
        return "ip"
    if kind.lower() == "header" and _TOKEN.match(name):
        return f"header:{name.lower()}"
    raise ValueError("expected ip or header:<Name>")


def check_redis_url(value: str) -> str:
    """`redis://host:port/db`, `rediss://...`, `unix:///path`, or empty."""
    value = value.strip()
    if value:
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018  # raises on a bad port
        except ValueError:
            raise ValueError("not a valid URL") from None
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("expected redis://host:port/db, rediss://... or unix:///path")
        if parts.scheme != "unix" and not parts.hostname:
            raise ValueError("no host")
    return value


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
    """A route's limit, its key function and the store its buckets live in; counts its refusals."""

    __slots__ = ("errors", "key", "limit", "refused", "route", "store")

    def __init__(self, route: str, limit: Limit, key: KeyFunction, store: Store) -> None:
        self.route = route
        self.limit = limit
        self.key = key
        self.store = store
        self.refused = 0  # lb_rate_limited_total{route}
        self.errors = 0  # lb_rate_limit_errors_total: decided by the fail policy

    async def check(self, headers: Sequence[tuple[bytes, bytes]], client_ip: str) -> Decision:
        """Take a token (a store that cannot answer decides by its fail policy, `error` set)."""
        return await self.store.take(f"{self.route}\x00{self.key(headers, client_ip)}", self.limit)

    async def admit(self, prepared: Any, tap: Any) -> Any:
        """Take a token for a prepared request, before a backend is chosen: the request, with the
        rate-limit headers added to its response's (`prepared.extra`), or when refused the 429/503
        answer carrying them."""
        info = prepared.info
        decision = await self.check(info.scope["headers"], info.client_ip)
        tap.rate_limit = "error" if decision.error else "pass" if decision.allowed else "limited"
        self.errors += decision.error
        extra = decision.headers()
        if not decision.allowed:
            self.refused += 1
            start, body = LIMITER_DOWN if decision.error else RATE_LIMITED
            return ({**start, "headers": [*start["headers"], *extra]}, body)
        prepared.extra.extend(extra)
        return prepared


RATE_LIMITED: Answer = json_error(429, "rate limited")
LIMITER_DOWN: Answer = json_error(503, "rate limiter unavailable")


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


def attach_limiters(settings: Any, clusters: Any, create_store: Callable[[], Store]) -> Store | None:
    """Give each cluster (route) with a rate limit its `RateLimiter`, all sharing one store
    (created only when some route is limited, and returned so its owner can close it)."""
    specs = {spec.prefix: (index, spec) for index, spec in enumerate(settings.routes)}
    limits = []
    for cluster in clusters:
        index, spec = specs.get(cluster.prefix, (None, None))
        limits.append((cluster, route_limit(settings, spec, f"LB_ROUTES[{index}]")))
    if all(limit is None for _, limit in limits):
        return None
    key = KeyFunction(settings.rate_limit_key, settings.rate_limit_ipv6_prefix)
    store = create_store()
    for cluster, limit in limits:
        if limit is not None:
            cluster.limiter = RateLimiter(cluster.prefix, limit, key, store)
    return store


def carry_limiters(old: Any, new: Any, settings: Any) -> None:
    """After a configuration reload: each route keeps its limiter (and its buckets); a route new
    to the table gets the top-level limit. Rate-limit values are read at start-up only."""
    limiters = {c.prefix: c.limiter for c in old if c.limiter is not None}
    if not limiters:
        return
    any_limiter = next(iter(limiters.values()))
    limit = route_limit(settings)
    for cluster in new:
        cluster.limiter = limiters.get(cluster.prefix)
        if cluster.limiter is None and cluster.prefix not in {c.prefix for c in old} and limit is not None:
            cluster.limiter = RateLimiter(cluster.prefix, limit, any_limiter.key, any_limiter.store)
