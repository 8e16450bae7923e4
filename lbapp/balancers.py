"""The built-in balancing policies, each one small class (the contract is in policy.py).

`create_balancer(name, ...)` builds one by name, or loads a `package.module:Class` plugin.
"""

from __future__ import annotations

import importlib
import inspect
import math
import random
import secrets
import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import cast

from .backend import Backend
from .hashing import ConsistentHash, IpHash, Sticky
from .policy import Balancer, RequestInfo


def load(backend: Backend) -> float:
    """In-flight requests per unit of effective weight (slow start), counting the one about to be sent."""
    return (backend.in_flight + 1) / backend.effective_weight()


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
            weight = backend.effective_weight()
            value = current.get(backend, 0) + weight
            current[backend] = value
            total += weight
            if value > best_value:
                best, best_value = backend, value
        current[best] -= total
        return best

    def forget(self, backend: Backend) -> None:
        self._current.pop(backend, None)


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
            weights = [b.effective_weight() for b in backends]
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
        return decayed * (backend.in_flight + 1) / backend.effective_weight()

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

    def forget(self, backend: Backend) -> None:
        self._cost.pop(backend, None)


class PolicyOptions:
    """What the built-in policies are configured with (one instance per cluster)."""

    __slots__ = ("hash_key", "sticky_cookie", "sticky_secret")

    def __init__(
        self, hash_key: str = "ip", sticky_cookie: str = "lbapp_sticky", sticky_secret: bytes | None = None
    ) -> None:
        self.hash_key = hash_key
        self.sticky_cookie = sticky_cookie
        # No secret configured: a random one (sticky cookies then last as long as this process).
        self.sticky_secret = sticky_secret or secrets.token_bytes(32)


POLICIES: dict[str, Callable[[PolicyOptions], Balancer]] = {
    "round_robin": lambda options: RoundRobin(),
    "weighted_round_robin": lambda options: WeightedRoundRobin(),
    "random": lambda options: Random(),
    "first": lambda options: First(),
    "least_conn": lambda options: LeastConn(),
    "p2c": lambda options: PowerOfTwo(),
    "least_time": lambda options: LeastTime(),
    "ip_hash": lambda options: IpHash(),
    "consistent_hash": lambda options: ConsistentHash(options.hash_key),
    "sticky": lambda options: Sticky(options.sticky_cookie, options.sticky_secret, WeightedRoundRobin()),
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


def check_algorithm(name: str) -> str:
    """Validate a policy name (settings call this): a built-in name, or a plugin that loads."""
    name = name.strip()
    if ":" in name:
        load_policy(name)
    elif name not in POLICIES:
        known = ", ".join(sorted(POLICIES))
        raise ValueError(f"unknown algorithm {name!r} (known: {known}, or package.module:Class)")
    return name


def create_balancer(name: str, options: PolicyOptions | None = None) -> Balancer:
    """A new policy instance (one per pool: policies keep per-pool state); `name` is validated."""
    if ":" in name:
        return load_policy(name)
    return POLICIES[check_algorithm(name)](options or PolicyOptions())
