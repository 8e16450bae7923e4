"""Balancing policies: exact sequences, distributions with fixed seeds, and end-to-end behaviour."""

from __future__ import annotations

import asyncio
import collections
import json
import random
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lbapp.backend import Backend
from lbapp.balancers import (
    POLICIES,
    First,
    LeastConn,
    LeastTime,
    PolicyOptions,
    PowerOfTwo,
    Random,
    RoundRobin,
    WeightedRoundRobin,
    create_balancer,
    load_policy,
)
from lbapp.cluster import Cluster
from lbapp.policy import RequestInfo
from lbapp.pool import Pool
from lbapp.settings import BackendSpec

from .conftest import EchoBackend, mark_down, mark_up, run_lb

REQUEST = RequestInfo({"headers": []}, "1.2.3.4")


def make_pool(*weights: int) -> Pool:
    return Pool([BackendSpec(url=f"http://b{i}:80", weight=w) for i, w in enumerate(weights)])


def names(picks: list[Backend]) -> list[str]:
    return [b.url.removeprefix("http://").removesuffix(":80") for b in picks]


def run(policy: Any, backends: Any, count: int) -> list[str]:
    return names([policy.pick(backends, REQUEST) for _ in range(count)])


def chi_square(counts: dict[str, int], expected: dict[str, float]) -> float:
    total = sum(counts.values())
    return sum((counts.get(k, 0) - p * total) ** 2 / (p * total) for k, p in expected.items() if p)


# Critical values of the chi-square distribution at p = 0.001: a correct policy fails 1 in 1000
# seeds; the seeds are fixed, so these tests are deterministic.
CHI2_0_001 = {1: 10.83, 2: 13.82, 3: 16.27}


def test_round_robin_is_a_strict_rotation_that_survives_pool_changes() -> None:
    pool = Pool([BackendSpec(url=f"http://b{i}:80") for i in range(3)])
    policy, request = RoundRobin(), RequestInfo({}, "1.2.3.4")
    picks = [policy.pick(pool.eligible, request).url for _ in range(6)]
    assert picks == ["http://b0:80", "http://b1:80", "http://b2:80"] * 2
    mark_down(pool, pool.backends[1])
    picks = [policy.pick(pool.eligible, request).url for _ in range(4)]
    assert sorted(set(picks)) == ["http://b0:80", "http://b2:80"]
    assert picks[0] != picks[1] and picks[1] != picks[2]


def test_smooth_weighted_round_robin_is_nginx_sequence() -> None:
    pool = make_pool(5, 1, 1)
    assert run(WeightedRoundRobin(), pool.eligible, 14) == ["b0", "b0", "b1", "b0", "b2", "b0", "b0"] * 2


def test_smooth_weighted_round_robin_with_equal_weights_is_round_robin() -> None:
    pool = make_pool(2, 2, 2)
    assert run(WeightedRoundRobin(), pool.eligible, 6) == ["b0", "b1", "b2"] * 2


def test_smooth_weighted_round_robin_spreads_the_heavy_backend() -> None:
    pool = make_pool(3, 2)
    assert run(WeightedRoundRobin(), pool.eligible, 10) == ["b0", "b1", "b0", "b1", "b0"] * 2


def test_weight_zero_is_never_picked_except_by_first() -> None:
    pool = make_pool(1, 0, 1)
    for name in POLICIES:
        if name == "first":
            continue
        policy = create_balancer(name, PolicyOptions(sticky_secret=b"0123456789abcdef"))
        cluster = Cluster(pool, policy)
        picks = {policy.pick(cluster.candidates(), REQUEST).url for _ in range(50)}
        assert "http://b1:80" not in picks, name
    # `first` sees the standby, in configured order: used once the backends before it are down.
    cluster = Cluster(pool, First())
    assert cluster.candidates()[0].url == "http://b0:80"
    mark_down(pool, pool.backends[0])
    assert First().pick(cluster.candidates(), REQUEST).url == "http://b1:80"


def test_first_fails_over_in_configured_order_and_back() -> None:
    pool = make_pool(1, 1, 1)
    policy = First()
    assert run(policy, pool.eligible, 3) == ["b0"] * 3
    mark_down(pool, pool.backends[0])
    assert run(policy, pool.eligible, 2) == ["b1"] * 2
    mark_up(pool, pool.backends[0])
    assert run(policy, pool.eligible, 1) == ["b0"]


def test_random_is_uniform() -> None:
    pool = make_pool(1, 1, 1)
    counts = collections.Counter(run(Random(random.Random(1)), pool.eligible, 30_000))
    assert chi_square(counts, {"b0": 1 / 3, "b1": 1 / 3, "b2": 1 / 3}) < CHI2_0_001[2]


def test_random_follows_weights() -> None:
    pool = make_pool(1, 2, 5)
    counts = collections.Counter(run(Random(random.Random(2)), pool.eligible, 40_000))
    assert chi_square(counts, {"b0": 1 / 8, "b1": 2 / 8, "b2": 5 / 8}) < CHI2_0_001[2]


def test_random_chi_square_detects_a_biased_policy() -> None:
    # The bound is tight enough to catch a policy that is only slightly off.
    rng = random.Random(3)
    counts = collections.Counter(
        "b0" if rng.random() < 0.36 else rng.choice(["b1", "b2"]) for _ in range(30_000)
    )
    assert chi_square(counts, {"b0": 1 / 3, "b1": 1 / 3, "b2": 1 / 3}) > CHI2_0_001[2]


def test_least_conn_picks_fewest_in_flight_and_rotates_ties() -> None:
    pool = make_pool(1, 1, 1)
    policy = LeastConn()
    assert run(policy, pool.eligible, 6) == ["b0", "b1", "b2"] * 2  # all idle: they share
    for backend, in_flight in zip(pool.backends, (3, 1, 2), strict=True):
        backend.in_flight = in_flight
    assert run(policy, pool.eligible, 3) == ["b1"] * 3
    pool.backends[0].in_flight = 1
    assert set(run(policy, pool.eligible, 4)) == {"b0", "b1"}


def test_least_conn_is_weighted() -> None:
    pool = make_pool(3, 1)
    policy = LeastConn()
    picks = []
    for _ in range(8):  # nothing finishes: the in-flight counts fill up in a 3:1 ratio
        backend = policy.pick(pool.eligible, REQUEST)
        backend.in_flight += 1
        picks.append(backend)
    assert collections.Counter(names(picks)) == {"b0": 6, "b1": 2}


def test_p2c_without_load_is_uniform() -> None:
    pool = make_pool(1, 1, 1)
    counts = collections.Counter(run(PowerOfTwo(random.Random(4)), pool.eligible, 30_000))
    assert chi_square(counts, {"b0": 1 / 3, "b1": 1 / 3, "b2": 1 / 3}) < CHI2_0_001[2]


def test_p2c_the_less_loaded_of_two_wins() -> None:
    # Loads 0 < 1 < 2: of the three equally likely pairs, b0 wins two and b1 one; b2 never wins.
    pool = make_pool(1, 1, 1)
    for backend, in_flight in zip(pool.backends, (0, 1, 2), strict=True):
        backend.in_flight = in_flight
    counts = collections.Counter(run(PowerOfTwo(random.Random(5)), pool.eligible, 30_000))
    assert counts["b2"] == 0
    assert chi_square(counts, {"b0": 2 / 3, "b1": 1 / 3}) < CHI2_0_001[1]


def test_p2c_with_one_backend() -> None:
    pool = make_pool(1)
    assert run(PowerOfTwo(random.Random(6)), pool.eligible, 3) == ["b0"] * 3


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_least_time_tries_unmeasured_backends_then_prefers_the_fast_one() -> None:
    pool = make_pool(1, 1)
    fast, slow = pool.backends
    clock = Clock()
    policy = LeastTime(decay=10, clock=clock)
    assert policy.pick(pool.eligible, REQUEST) is fast  # nothing measured, nothing in flight: a tie
    fast.in_flight = 1
    assert policy.pick(pool.eligible, REQUEST) is slow  # an idle unmeasured backend is tried
    slow.in_flight = 1
    policy.observe(fast, 0.01, True)
    fast.in_flight = 0
    assert run(policy, pool.eligible, 3) == ["b0"] * 3  # the other one's first answer is still out
    policy.observe(slow, 0.2, True)
    slow.in_flight = 0
    assert run(policy, pool.eligible, 3) == ["b0"] * 3
    fast.in_flight = 20  # 0.01 x 21 > 0.2 x 1: the in-flight count counts too
    assert policy.pick(pool.eligible, REQUEST) is slow


def test_least_time_decays_so_a_slow_backend_is_tried_again() -> None:
    pool = make_pool(1, 1)
    fast, slow = pool.backends
    clock = Clock()
    policy = LeastTime(decay=10, clock=clock)
    policy.observe(fast, 0.01, True)
    policy.observe(slow, 0.2, True)
    # The fast one keeps answering in 10 ms; the slow one is left alone. 0.2 e^(-t/10) < 0.01
    # once t > 10 ln 20 = 29.96 s: it is tried again then, not before.
    for _ in range(29):
        clock.now += 1
        policy.observe(fast, 0.01, True)
        assert policy.pick(pool.eligible, REQUEST) is fast
    clock.now += 1
    policy.observe(fast, 0.01, True)
    assert policy.pick(pool.eligible, REQUEST) is slow


def test_least_time_peak_then_ewma() -> None:
    pool = make_pool(1)
    backend = pool.backends[0]
    clock = Clock()
    policy = LeastTime(decay=10, clock=clock)
    policy.observe(backend, 0.01, True)
    policy.observe(backend, 0.5, True)  # slower: taken at once
    assert policy.cost(backend, clock.now) == pytest.approx(0.5)
    clock.now += 10
    policy.observe(backend, 0.01, True)  # faster: averaged with weight 1 - e^-1
    expected = 0.5 * 0.36787944 + 0.01 * (1 - 0.36787944)
    assert policy.cost(backend, clock.now) == pytest.approx(expected)
    policy.observe(backend, 0.001, False)  # a failure counts as at least a second
    assert policy.cost(backend, clock.now) == pytest.approx(1.0)


def test_every_named_policy_is_created_and_picks() -> None:
    pool = make_pool(1, 2, 3)
    for name in POLICIES:
        policy = create_balancer(name, PolicyOptions(sticky_secret=b"0123456789abcdef"))
        assert policy.pick(pool.eligible, REQUEST) in pool.eligible, name
    with pytest.raises(ValueError, match="unknown algorithm 'fastest'"):
        create_balancer("fastest")


PLUGIN = """
class AlwaysLast:
    def pick(self, backends, request):
        return backends[-1]

class NoPick:
    pass

class BadPick:
    def pick(self):
        return None

class Explodes:
    def __init__(self):
        raise RuntimeError("boom")

not_a_class = 3
"""


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    (tmp_path / "my_policies.py").write_text(textwrap.dedent(PLUGIN))
    (tmp_path / "broken_policies.py").write_text("raise ImportError('needs numpy')\n")
    (tmp_path / "crashing_policies.py").write_text("1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_policies"
    for name in ("my_policies", "broken_policies", "crashing_policies"):
        sys.modules.pop(name, None)


def test_plugin_policy_is_loaded(plugin: str) -> None:
    policy = load_policy(f"{plugin}:AlwaysLast")
    pool = make_pool(1, 1, 1)
    assert run(policy, pool.eligible, 2) == ["b2", "b2"]


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("no_such_module:Policy", "cannot import 'no_such_module'"),
        ("broken_policies:Policy", "cannot import 'broken_policies' (needs numpy)"),
        ("crashing_policies:Policy", "importing 'crashing_policies' failed: ZeroDivisionError"),
        ("my_policies:Missing", "module 'my_policies' has no class 'Missing'"),
        ("my_policies:not_a_class", "module 'my_policies' has no class 'not_a_class'"),
        ("my_policies:NoPick", "my_policies:NoPick has no method pick(backends, request)"),
        ("my_policies:BadPick", "my_policies:BadPick has no method pick(backends, request)"),
        ("my_policies:Explodes", "my_policies:Explodes() failed: RuntimeError: boom"),
        ("my_policies:", "expected a policy name or package.module:ClassName"),
    ],
)
def test_plugin_errors_stop_start_up_with_one_line(plugin: str, reference: str, message: str) -> None:
    from lbapp import SettingsError, load_settings

    with pytest.raises(SettingsError) as error:  # validated with the settings, before any app
        load_settings(backends=["http://a:1"], algorithm=reference)
    assert str(error.value).startswith("invalid setting LB_ALGORITHM: ")
    assert message in str(error.value)
    assert "\n" not in str(error.value)


# End to end: real echo backends behind a real load balancer.


def test_plugin_policy_is_used_by_the_load_balancer(
    plugin: str, echo_factory: Callable[..., EchoBackend]
) -> None:
    backends = [echo_factory(f"backend-{i}") for i in (1, 2, 3)]
    with run_lb([b.url for b in backends], algorithm=f"{plugin}:AlwaysLast") as server:
        servers = {httpx.get(server.url + "/x").json()["server"] for _ in range(5)}
    assert servers == {"backend-3"}


def spread_under_load(port: int, requests: int = 150, clients: int = 24) -> collections.Counter[str]:
    """`requests` GETs from `clients` concurrent keep-alive clients; how many each backend answered.

    A bare asyncio client: an HTTP client library in threads would eat the CPU the load balancer
    needs on a small machine, and then every backend looks slow from the balancer's side.
    """
    counts: collections.Counter[str] = collections.Counter()
    remaining = iter(range(requests))

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in remaining:
                writer.write(b"GET /x HTTP/1.1\r\nHost: lb.test\r\n\r\n")
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower().split("\r\n")
                assert head[0].startswith("http/1.1 200"), head[0]
                length = next(int(line[15:]) for line in head if line.startswith("content-length:"))
                counts[json.loads(await reader.readexactly(length))["server"]] += 1
        finally:
            writer.close()

    async def main() -> None:
        await asyncio.wait_for(asyncio.gather(*(client() for _ in range(clients))), timeout=60)

    asyncio.run(main())
    return counts


@pytest.mark.parametrize("algorithm", ["least_conn", "least_time"])
def test_a_slow_backend_gets_clearly_less_traffic_but_some(
    algorithm: str, echo_factory: Callable[..., EchoBackend]
) -> None:
    fast = [echo_factory("fast-1"), echo_factory("fast-2")]
    slow = echo_factory("slow", "--latency", "0.2")
    with run_lb([fast[0].url, slow.url, fast[1].url], algorithm=algorithm) as server:
        counts = spread_under_load(server.port)
    assert sum(counts.values()) == 150
    assert counts["slow"] > 0, counts
    # Round robin gives it 50 of 150 (the control below); here less than half a fast one's share.
    assert counts["slow"] * 2 < min(counts["fast-1"], counts["fast-2"]), counts


def test_round_robin_gives_the_slow_backend_its_full_share(echo_factory: Callable[..., EchoBackend]) -> None:
    # The control for the test above: the same load under round robin is not skewed.
    fast = [echo_factory("fast-1"), echo_factory("fast-2")]
    slow = echo_factory("slow", "--latency", "0.2")
    with run_lb([fast[0].url, slow.url, fast[1].url]) as server:
        counts = spread_under_load(server.port)
    assert counts == {"fast-1": 50, "slow": 50, "fast-2": 50}
