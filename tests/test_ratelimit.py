"""The token bucket with a controllable clock, key extraction, the local and shared stores."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lbapp import create_app
from lbapp.limitstores import LocalStore, SharedStore
from lbapp.ratelimit import (
    Decision,
    KeyFunction,
    Limit,
    RateLimiter,
    check_key,
    parse_rate,
    route_limit,
)
from lbapp.settings import Settings, SettingsError, load_settings

from .conftest import ROOT


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def take_all(store: LocalStore | SharedStore, key: str, limit: Limit, count: int) -> list[Decision]:
    return [store.take_now(key, limit) for _ in range(count)]


def allowed(decisions: list[Decision]) -> int:
    return sum(d.allowed for d in decisions)


@pytest.mark.parametrize(
    ("text", "expected"), [("10/s", (10, 1.0)), (" 600 / m ", (600, 60.0)), ("1/h", (1, 3600.0))]
)
def test_parse_rate(text: str, expected: tuple[int, float]) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize("text", ["", "10", "0/s", "-1/s", "1.5/s", "10/d", "ten/s", "10/s/s"])
def test_parse_rate_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="expected <n>/s"):
        parse_rate(text)


def test_check_key() -> None:
    assert check_key("ip") == "ip"
    assert check_key(" IP ") == "ip"
    assert check_key("header:X-API-Key") == "header:x-api-key"
    for bad in ("", "path", "header:", "header:a b", "cookie:x", "ip:x"):
        with pytest.raises(ValueError, match="expected ip or header"):
            check_key(bad)


@pytest.mark.parametrize(("rate", "burst"), [("10/s", None), ("3/s", 7), ("100/m", 5), ("7/h", None)])
@pytest.mark.parametrize("store_kind", ["local", "shared"])
def test_exact_burst_then_refill(rate: str, burst: int | None, store_kind: str, tmp_path: Path) -> None:
    clock = FakeClock()
    store = (
        LocalStore(clock=clock) if store_kind == "local" else SharedStore(str(tmp_path / "t"), clock=clock)
    )
    limit = Limit.parse(rate, burst)
    expected_burst = burst if burst is not None else parse_rate(rate)[0]
    decisions = take_all(store, "k", limit, expected_burst + 5)
    assert [d.allowed for d in decisions] == [True] * expected_burst + [False] * 5
    assert [d.remaining for d in decisions[:expected_burst]] == list(range(expected_burst - 1, -1, -1))
    # Just before one token is back: still refused; at that moment: exactly one more.
    clock.now += limit.interval * 0.999
    assert not store.take_now("k", limit).allowed
    clock.now += limit.interval * 0.001
    assert [d.allowed for d in take_all(store, "k", limit, 3)] == [True, False, False]
    # Three tokens' time: three more, not four.
    clock.now += 3 * limit.interval
    assert allowed(take_all(store, "k", limit, 10)) == 3
    # After the whole window (and more) the bucket is full again, never fuller.
    clock.now += 10 * limit.capacity
    assert allowed(take_all(store, "k", limit, expected_burst * 2)) == expected_burst


@pytest.mark.parametrize("store_kind", ["local", "shared"])
def test_two_keys_are_independent(store_kind: str, tmp_path: Path) -> None:
    clock = FakeClock()
    store = (
        LocalStore(clock=clock) if store_kind == "local" else SharedStore(str(tmp_path / "t"), clock=clock)
    )
    limit = Limit.parse("5/s")
    assert allowed(take_all(store, "a", limit, 8)) == 5
    assert allowed(take_all(store, "b", limit, 8)) == 5
    assert not store.take_now("a", limit).allowed


def test_steady_rate_over_time() -> None:
    """At 10/s with burst 10, a client asking 50 times a second gets 10 + 10 per second."""
    clock = FakeClock()
    store = LocalStore(clock=clock)
    limit = Limit.parse("10/s")
    granted = 0
    for _ in range(50 * 5):
        granted += store.take_now("k", limit).allowed
        clock.now += 0.02
    assert granted in (10 + 49, 10 + 50)  # 10 at once, then one per 0.1 s over 4.98 s


def test_headers_of_allowed_and_refused() -> None:
    clock = FakeClock()
    store = LocalStore(clock=clock)
    limit = Limit.parse("10/m", burst=4)  # a token every 6 s; empty to full in 24 s
    first = store.take_now("k", limit)
    assert dict(first.headers()) == {
        b"ratelimit-policy": b'"default";q=4;w=24',
        b"ratelimit": b'"default";r=3;t=6',
    }
    take_all(store, "k", limit, 3)
    clock.now += 1.5
    refused = store.take_now("k", limit)
    assert not refused.allowed
    # 24 - 1.5 = 22.5 s until full; a token in 6 - 1.5 = 4.5 s: Retry-After 5, and t the same.
    assert dict(refused.headers()) == {
        b"ratelimit-policy": b'"default";q=4;w=24',
        b"ratelimit": b'"default";r=0;t=5',
        b"retry-after": b"5",
    }
    clock.now += 4.5
    again = store.take_now("k", limit)
    assert again.allowed and dict(again.headers())[b"ratelimit"] == b'"default";r=0;t=24'


def test_retry_after_is_at_least_one_second() -> None:
    clock = FakeClock()
    store = LocalStore(clock=clock)
    limit = Limit.parse("100/s")
    take_all(store, "k", limit, 100)
    refused = store.take_now("k", limit)
    assert not refused.allowed and refused.retry_after == 1
    assert dict(refused.headers())[b"ratelimit"] == b'"default";r=0;t=1'
    assert limit.policy == b'"default";q=100;w=1'


def test_a_stale_future_value_reads_as_full() -> None:
    """A value further ahead than the limit allows (other boot, other settings) is a full bucket."""
    limit = Limit.parse("1/s")
    full_at, decision = limit.decide(10_000.0, 1.0)
    assert decision.allowed and full_at == 2.0


def test_header_key_with_fallback_to_address() -> None:
    key = KeyFunction("header:x-api-key")
    assert key([(b"x-api-key", b"tenant-1")], "192.0.2.1") == "h:tenant-1"
    assert key([(b"accept", b"*/*")], "192.0.2.1") == "192.0.2.1"
    assert key([(b"x-api-key", b"  ")], "192.0.2.1") == "192.0.2.1"
    assert key([(b"x-api-key", b"192.0.2.1")], "192.0.2.9") != key([], "192.0.2.1")
    long_value = b"x" * 10_000
    hashed = key([(b"x-api-key", long_value)], "192.0.2.1")
    assert len(hashed) < 70 and hashed == key([(b"x-api-key", long_value)], "192.0.2.2")
    assert hashed != key([(b"x-api-key", long_value + b"y")], "192.0.2.1")


def test_ipv6_clients_grouped_by_prefix() -> None:
    key = KeyFunction("ip")
    a = key([], "2001:db8:1:2:aaaa::1")
    assert a == key([], "2001:db8:1:2:ffff:ffff:ffff:ffff") == "2001:db8:1:2::/64"
    assert a != key([], "2001:db8:1:3::1")
    assert key([], "::ffff:192.0.2.7") == "192.0.2.7"
    assert key([], "198.51.100.1") == "198.51.100.1"
    narrow = KeyFunction("ip", ipv6_prefix=128)
    assert narrow([], "2001:db8::1") != narrow([], "2001:db8::2")
    wide = KeyFunction("ip", ipv6_prefix=48)
    assert wide([], "2001:db8:1:2::1") == wide([], "2001:db8:1:ffff::1") == "2001:db8:1::/48"


async def test_limiter_buckets_are_per_route_and_key() -> None:
    clock = FakeClock()
    store = LocalStore(clock=clock)
    key = KeyFunction("ip")
    api = RateLimiter("/api", Limit.parse("2/s"), key, store)
    web = RateLimiter("/", Limit.parse("3/s"), key, store)
    results = [await api.check([], "192.0.2.1") for _ in range(4)]
    assert [d.allowed for d in results] == [True, True, False, False]
    assert sum([(await web.check([], "192.0.2.1")).allowed for _ in range(4)]) == 3
    assert (await api.check([], "192.0.2.2")).allowed


def test_local_store_is_bounded_and_drops_full_buckets_first() -> None:
    clock = FakeClock()
    store = LocalStore(max_keys=1000, clock=clock)
    limit = Limit.parse("1/s", burst=5)
    take_all(store, "busy", limit, 5)  # 5 s from full: the longest debt, kept over the others
    for i in range(20_000):
        store.take_now(f"10.0.{i // 256}.{i % 256}", limit)
        assert len(store.buckets) <= 1000
    assert not store.take_now("busy", limit).allowed  # its bucket survived the flood
    # Once they are full, old buckets make room without evicting anything that is not full.
    clock.now += 5
    evicted = store.evicted
    for i in range(999):
        store.take_now(f"new-{i}", limit)
    assert store.evicted == evicted and len(store.buckets) <= 1000


MEASURE = """
import os, sys, time
from lbapp.limitstores import LocalStore
from lbapp.ratelimit import KeyFunction, Limit, RateLimiter
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) * 1024
limiter = RateLimiter("/", Limit.parse("10/m"), KeyFunction("ip"), LocalStore(int(sys.argv[2])))
before = rss()
for i in range(int(sys.argv[1])):
    limiter.store.take_now("/\\x00" + limiter.key([], f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"),
                           limiter.limit)
print(rss() - before, len(limiter.store.buckets))
"""


def test_memory_with_a_million_distinct_keys_is_bounded() -> None:
    """1,000,000 distinct clients, none of whose buckets refills during the run (10/m): memory
    stays that of max_keys buckets, the rest evicted closest-to-full first."""
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, "1000000", "100000"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=100,
    ).stdout.split()
    growth, kept = int(out[0]), int(out[1])
    assert kept <= 100_000
    assert growth < 40 * 1024 * 1024, f"RSS grew by {growth / 2**20:.1f} MiB"


def _hammer(path: str, rounds: int, start: Any, results: Any) -> None:
    store = SharedStore(path)
    limit = Limit.parse("1/h", burst=50_000)
    start.wait(10)
    results.put(sum(store.take_now("shared", limit).allowed for _ in range(rounds)))
    asyncio.run(store.aclose())


def test_shared_store_is_one_limit_across_processes(tmp_path: Path) -> None:
    """Two processes taking 40,000 tokens each from one bucket of 50,000 at once: exactly 50,000."""
    path = str(tmp_path / "table")
    context = multiprocessing.get_context("spawn")
    start, results = context.Event(), context.Queue()
    workers = [context.Process(target=_hammer, args=(path, 40_000, start, results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        start.set()
        granted = [results.get(timeout=60) for _ in workers]
    finally:
        for worker in workers:
            worker.join(timeout=30)
    assert sum(granted) == 50_000, granted
    assert os.path.getsize(path) == SharedStore.HEADER + 8192 * 16 * 16


def test_shared_store_evicts_only_when_a_set_is_full(tmp_path: Path) -> None:
    clock = FakeClock()
    store = SharedStore(str(tmp_path / "t"), max_keys=16, clock=clock)  # one set of 16 slots
    assert store.sets == 1
    limit = Limit.parse("1/s", burst=2)
    for i in range(16):
        store.take_now(f"k{i}", limit)
    assert store.evicted == 0
    store.take_now("k0", limit)  # k0 now owes two tokens
    store.take_now("k16", limit)  # a 17th live key: evicts one closest to full (not k0)
    assert store.evicted == 1
    assert not store.take_now("k0", limit).allowed
    clock.now += 2  # all full: slots are reused without eviction
    for i in range(16):
        store.take_now(f"n{i}", limit)
    assert store.evicted == 1


# --- settings -------------------------------------------------------------------------------


def test_rate_limit_settings_defaults() -> None:
    settings = Settings(backends=["http://127.0.0.1:1"])
    assert settings.rate_limit == "" and route_limit(settings) is None
    assert settings.rate_limit_burst is None
    assert settings.rate_limit_key == "ip"
    assert settings.rate_limit_ipv6_prefix == 64
    assert settings.rate_limit_redis_url == ""
    assert settings.rate_limit_redis_timeout == 0.05
    assert settings.rate_limit_fail_open is True
    assert settings.rate_limit_max_keys == 100_000


def test_rate_limit_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LB_RATE_LIMIT", "120/m")
    monkeypatch.setenv("LB_RATE_LIMIT_BURST", "30")
    monkeypatch.setenv("LB_RATE_LIMIT_KEY", "header:X-Tenant")
    monkeypatch.setenv("LB_RATE_LIMIT_REDIS_URL", "redis://:pw@127.0.0.1:6379/2")
    monkeypatch.setenv("LB_RATE_LIMIT_REDIS_TIMEOUT", "20ms")
    monkeypatch.setenv("LB_RATE_LIMIT_FAIL_OPEN", "false")
    settings = load_settings()
    limit = route_limit(settings)
    assert limit is not None and limit.burst == 30 and limit.interval == 0.5
    assert settings.rate_limit_key == "header:x-tenant"
    assert settings.rate_limit_redis_timeout == 0.02 and settings.rate_limit_fail_open is False


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LB_RATE_LIMIT": "10/d"}, "invalid setting LB_RATE_LIMIT: expected <n>/s"),
        ({"LB_RATE_LIMIT_BURST": "5"}, "invalid setting LB_RATE_LIMIT_BURST: needs LB_RATE_LIMIT"),
        ({"LB_RATE_LIMIT": "5/s", "LB_RATE_LIMIT_BURST": "0"}, "invalid setting LB_RATE_LIMIT_BURST:"),
        ({"LB_RATE_LIMIT_KEY": "cookie:a"}, "invalid setting LB_RATE_LIMIT_KEY: expected ip or header"),
        ({"LB_RATE_LIMIT_IPV6_PREFIX": "129"}, "invalid setting LB_RATE_LIMIT_IPV6_PREFIX:"),
        ({"LB_RATE_LIMIT_REDIS_URL": "http://h"}, "invalid setting LB_RATE_LIMIT_REDIS_URL: expected redis"),
        ({"LB_RATE_LIMIT_REDIS_TIMEOUT": "0"}, "invalid setting LB_RATE_LIMIT_REDIS_TIMEOUT:"),
        ({"LB_RATE_LIMIT_FAIL_OPEN": "maybe"}, "invalid setting LB_RATE_LIMIT_FAIL_OPEN:"),
    ],
)
def test_bad_rate_limit_settings_stop_start_up(
    env: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert str(caught.value).startswith(message), caught.value
    assert "\n" not in str(caught.value)


def test_redis_url_password_never_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LB_RATE_LIMIT_REDIS_URL", "redis://:hunter2hunter2@/0")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert "hunter2" not in str(caught.value)


def test_route_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "lb.json"
    config.write_text(
        json.dumps(
            {
                "rate_limit": "10/s",
                "routes": [
                    {"prefix": "/api", "backends": "http://127.0.0.1:1", "rate_limit": "2/s"},
                    {"prefix": "/big", "backends": "http://127.0.0.1:1", "rate_limit_burst": 50},
                    {"prefix": "/free", "backends": "http://127.0.0.1:1", "rate_limit": "off"},
                    {"prefix": "/same", "backends": "http://127.0.0.1:1"},
                ],
            }
        )
    )
    monkeypatch.setenv("LB_CONFIG", str(config))
    settings = load_settings()
    api, big, free, same = (route_limit(settings, spec) for spec in settings.routes)
    assert api is not None and (api.burst, api.interval) == (2, 0.5)
    assert big is not None and (big.burst, big.interval) == (50, 0.1)
    assert free is None
    assert same is not None and (same.burst, same.interval) == (10, 0.1)


def test_route_burst_without_any_rate_is_refused() -> None:
    settings = Settings(
        backends=["http://127.0.0.1:1"],
        routes=[{"prefix": "/a", "backends": "http://127.0.0.1:1", "rate_limit_burst": 5}],
    )
    with pytest.raises(SettingsError, match=r"invalid setting LB_ROUTES\[0\].rate_limit_burst: needs a rate"):
        create_app(settings)
    with pytest.raises(SettingsError, match=r"LB_ROUTES\[0\].rate_limit: expected <n>/s"):
        load_settings(routes=[{"prefix": "/a", "backends": "http://127.0.0.1:1", "rate_limit": "fast"}])


def test_access_log_text_line_names_the_rate_limit_verdict() -> None:
    import logging

    from lbapp.logs import TextFormatter

    def line(verdict: str | None) -> str:
        entry = logging.LogRecord("lbapp.access", logging.INFO, __file__, 1, "access", None, None)
        entry.access = {  # type: ignore[attr-defined]
            "request_id": "rid", "client": "10.0.0.9", "method": "GET", "path": "/a", "status": 429,
            "backend": None, "attempts": 0, "upstream_ms": None, "total_ms": 0.5, "bytes_in": 0,
            "bytes_out": 26, "rate_limit": verdict,
        }  # fmt: skip
        return TextFormatter().format(entry)

    assert line("limited").endswith(" id=rid ratelimit=limited")
    assert line(None).endswith(" id=rid")


def test_a_reload_keeps_each_routes_limiter_and_limits_new_routes() -> None:
    from types import SimpleNamespace

    from lbapp.ratelimit import carry_limiters

    settings = Settings(backends=["http://127.0.0.1:1"], rate_limit="5/s")
    store = LocalStore()
    kept = RateLimiter("/", Limit.parse("5/s"), KeyFunction("ip"), store)
    old = [SimpleNamespace(prefix="/", limiter=kept), SimpleNamespace(prefix="/off", limiter=None)]
    new = [SimpleNamespace(prefix=p, limiter=None) for p in ("/", "/off", "/new")]
    carry_limiters(old, new, settings)
    assert new[0].limiter is kept  # same buckets, same counters
    assert new[1].limiter is None  # a route without a limit stays without
    added = new[2].limiter
    assert added is not None and added.store is store and added.limit.burst == 5 and added.route == "/new"
