"""Balancing policies (unit level)."""

from __future__ import annotations

from lbapp.balancers import RequestInfo, RoundRobin
from lbapp.pool import Pool
from lbapp.settings import BackendSpec


def test_round_robin_is_a_strict_rotation_that_survives_pool_changes() -> None:
    pool = Pool([BackendSpec(url=f"http://b{i}:80") for i in range(3)])
    policy, request = RoundRobin(), RequestInfo({}, "1.2.3.4")
    picks = [policy.pick(pool.eligible, request).url for _ in range(6)]
    assert picks == ["http://b0:80", "http://b1:80", "http://b2:80"] * 2
    pool.backends[1].state = "unhealthy"
    pool.refresh()
    picks = [policy.pick(pool.eligible, request).url for _ in range(4)]
    assert sorted(set(picks)) == ["http://b0:80", "http://b2:80"]
    assert picks[0] != picks[1] and picks[1] != picks[2]
