"""Balancing policies: each one small class with `pick(backends, request) -> Backend`.

Policies only ever see eligible backends (healthy, weight above 0, in configured order), and
`backends` is never empty. Two optional methods let a policy learn and answer, and the proxy
calls them only for the policies that have them (round robin pays nothing):

- `observe(backend, seconds, ok)`: an attempt on `backend` ended after `seconds` (time to the
  response head), `ok` False when it failed without an answer.
- `response_headers(backend, request)`: headers to add to the client's response, or None.

A policy with `standby = True` also sees healthy backends of weight 0 (only `first` does).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import random
import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import Any, Protocol, cast

from .hashing import ConsistentHash, IpHash, Sticky, sticky_secret
from .pool import Backend, effective_weight
from .settings import Settings

logger = logging.getLogger("lbapp.balancers")

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


def load(backend: Backend) -> float:
    """In-flight requests per unit of effective weight (slow start), counting the one about to be sent."""
    return (backend.in_flight + 1) / (backend.weight if not backend.ramp_until else backend.ramp_weight())


class RoundRobin:
    """Strict rotation over the eligible backends."""

    def __init__(self) -> None:
        self._next = 0

    def pick(self, backends: Sequence[Backend], request: RequestInfo) -> Backend:
        index = self._next % len(backends)
        self._next = index + 1
        return backends[index]


class WeightedRoundRobin:
    """nginx's smooth weighted round robin: weights 5,1,1 give a,a,b,a,c,a,a (no bursts)."""

    def __init__(self) -> None:
        self._current: dict[Backend, float] = {}

    def pick(self, backends: Sequence[Backend], request: RequestInfo) -> Backend:
        current = self._current
        total: float = 0
        best = backends[0]
        best_value = -math.inf
        for backend in backends:
            weight = backend.weight if not backend.ramp_until else backend.ramp_weight()
            value = current.get(backend, 0) + weight
            current[backend] = value
            total += weight
            if value > best_value:
                best, best_value = backend, value
        current[best] -= total
        return best


class Random:
    """Uniform random choice, or weighted by `weight` when the weights differ."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._for: Sequence[Backend] = ()
        self._cumulative: list[float] | None = None
        self._ramping = False

    def pick(self, backends: Sequence[Backend], request: RequestInfo) -> Backend:
        if backends is not self._for or self._ramping:
            # Cached per eligible tuple; recomputed on every pick only while a backend ramps up.
            self._for = backends
            self._ramping = any(b.ramp_until for b in backends)
            weights = [effective_weight(b) for b in backends]
            self._cumulative = list(accumulate(weights)) if len(set(weights)) > 1 else None
        cumulative = self._cumulative
        if cumulative is None:
            return backends[self._rng.randrange(len(backends))]
        return backends[bisect_right(cumulative, self._rng.random() * cumulative[-1])]


class First:
    """The first healthy backend in configured order, weight-0 standbys included (failover)."""

    standby = True

    def pick(self, backends: Sequence[Backend], request: RequestInfo) -> Backend:
        return backends[0]


class LeastConn:
    """Fewest in-flight requests per unit of weight; ties rotate so equal backends share."""

    def __init__(self) -> None:
        self._next = 0

    def pick(self, backends: Sequence[Backend], request: RequestInfo) -> Backend:
        count = len(backends)
        start = self._next % count
        self._next = start + 1
        best = backends[start]
        best_load = load(best)
        for step in range(1, count):
            backend = backends[(start + step) % count]
            backend_load = load(backend)
            if backend_load < best_load:
                best, best_load = backend, backend_load
        return best


class PowerOfTwo:
    """Power of two random choices: of two distinct random backends, the less loaded one."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, backends: Sequence[Backend], request: RequestInfo) -> Backend:
        count = len(backends)
        if count == 1:
            return backends[0]
        first = self._rng.randrange(count)
        second = self._rng.randrange(count - 1)
        second += second >= first
        a, b = backends[first], backends[second]
        return b if load(b) < load(a) else a


class LeastTime:
    """Peak-EWMA of the response time x (in-flight + 1), as Finagle and Linkerd do it.

    A slower answer than the estimate replaces it at once (peak); faster ones pull it down with
    weight 1 - exp(-dt/decay). Between observations the estimate decays towards 0 with the same
    time constant, so a backend that was slow once and then left alone is tried again. A backend
    never measured is tried when it is idle, and counts as very costly while its first request
    is still out.
    """

    UNMEASURED = 1e6
    FAILURE_SECONDS = 1.0  # a failed attempt counts as at least this slow

    def __init__(self, decay: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.decay = decay
        self.clock = clock
        self._cost: dict[Backend, tuple[float, float]] = {}  # backend -> (seconds, measured at)
        self._next = 0

    def cost(self, backend: Backend, now: float) -> float:
        measured = self._cost.get(backend)
        if measured is None:
            return self.UNMEASURED + backend.in_flight if backend.in_flight else 0.0
        seconds, stamp = measured
        decayed = seconds * math.exp(-max(now - stamp, 0.0) / self.decay)
        return decayed * (backend.in_flight + 1) / effective_weight(backend)

    def pick(self, backends: Sequence[Backend], request: RequestInfo) -> Backend:
        now = self.clock()
        count = len(backends)
        start = self._next % count
        self._next = start + 1
        best = backends[start]
        best_cost = self.cost(best, now)
        for step in range(1, count):
            backend = backends[(start + step) % count]
            backend_cost = self.cost(backend, now)
            if backend_cost < best_cost:
                best, best_cost = backend, backend_cost
        return best

    def observe(self, backend: Backend, seconds: float, ok: bool) -> None:
        if not ok:
            seconds = max(seconds, self.FAILURE_SECONDS)
        now = self.clock()
        measured = self._cost.get(backend)
        if measured is None or seconds > measured[0]:
            self._cost[backend] = (seconds, now)
            return
        weight = math.exp(-max(now - measured[1], 0.0) / self.decay)
        self._cost[backend] = (measured[0] * weight + seconds * (1.0 - weight), now)


POLICIES: dict[str, Callable[[Settings], Balancer]] = {
    "round_robin": lambda settings: RoundRobin(),
    "weighted_round_robin": lambda settings: WeightedRoundRobin(),
    "random": lambda settings: Random(),
    "first": lambda settings: First(),
    "least_conn": lambda settings: LeastConn(),
    "p2c": lambda settings: PowerOfTwo(),
    "least_time": lambda settings: LeastTime(),
    "ip_hash": lambda settings: IpHash(),
    "consistent_hash": lambda settings: ConsistentHash(settings.hash_key),
    "sticky": lambda settings: Sticky(settings.sticky_cookie, sticky_secret(settings), WeightedRoundRobin()),
}


def load_policy(reference: str) -> Balancer:
    """`package.module:ClassName`: import it, instantiate it with no arguments, check `pick`."""
    module_name, _, class_name = reference.partition(":")
    if not module_name or not class_name.isidentifier():
        raise ValueError(f"{reference!r}: expected a policy name or package.module:ClassName")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r} ({exc})") from None
    except Exception as exc:
        raise ValueError(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise ValueError(f"module {module_name!r} has no class {class_name!r}")
    try:
        policy = cls()
    except Exception as exc:
        raise ValueError(f"{reference}() failed: {type(exc).__name__}: {exc}") from None
    pick = getattr(policy, "pick", None)
    try:
        inspect.signature(pick).bind(None, None)  # type: ignore[arg-type]  # None: TypeError
    except (TypeError, ValueError):
        raise ValueError(f"{reference} has no method pick(backends, request)") from None
    return cast(Balancer, policy)


def create_balancer(name: str, settings: Settings) -> Balancer:
    """A new policy instance (one per pool: policies keep per-pool state)."""
    if ":" in name:
        return load_policy(name)
    try:
        factory = POLICIES[name]
    except KeyError:
        known = ", ".join(sorted(POLICIES))
        raise ValueError(f"unknown algorithm {name!r} (known: {known}, or package.module:Class)") from None
    return factory(settings)
