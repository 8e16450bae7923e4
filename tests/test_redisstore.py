"""The Redis store against a real redis-server: atomicity, expiry, script reloads, outages."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import pytest
import redis as redis_sync

from lbapp.ratelimit import Limit
from lbapp.redisstore import KEY_PREFIX, RETRY_INTERVAL, RedisStore

from .conftest import RedisServer


async def poll(predicate: Callable[[], object], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {seconds}s")
        await asyncio.sleep(0.02)


async def test_concurrent_callers_from_two_clients_get_exactly_the_burst(redis_server: RedisServer) -> None:
    stores = [RedisStore(redis_server.url, timeout=5.0) for _ in range(2)]
    limit = Limit.parse("1/h", burst=50)
    try:
        decisions = await asyncio.gather(*(stores[i % 2].take("client", limit) for i in range(300)))
    finally:
        for store in stores:
            await store.aclose()
    assert sum(d.allowed for d in decisions) == 50
    assert not any(d.error for d in decisions)
    assert sorted(d.remaining for d in decisions if d.allowed) == list(range(50))
    assert {d.retry_after for d in decisions if not d.allowed} == {3600}


async def test_bucket_values_headers_and_expiry(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, timeout=5.0)
    direct = redis_sync.Redis.from_url(redis_server.url)
    limit = Limit.parse("10/s", burst=3)
    try:
        first = await store.take("k", limit)
        assert first.allowed and first.remaining == 2
        assert dict(first.headers())[b"ratelimit"] == b'"default";r=2;t=1'
        assert 0 < direct.pttl(KEY_PREFIX + "k") <= 100  # the key lives until the bucket is full
        assert [(await store.take("k", limit)).allowed for _ in range(3)] == [True, True, False]
        assert (await store.take("other", limit)).allowed  # keys are independent
        # Full again: the key is gone from Redis (nothing is kept for idle clients).
        await poll(lambda: direct.exists(KEY_PREFIX + "k") == 0, seconds=5)
        assert [(await store.take("k", limit)).allowed for _ in range(4)] == [True, True, True, False]
    finally:
        await store.aclose()
        direct.close()


async def test_script_reloaded_after_script_flush(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, timeout=5.0)
    direct = redis_sync.Redis.from_url(redis_server.url)
    limit = Limit.parse("1/h", burst=2)
    try:
        assert (await store.take("k", limit)).allowed
        direct.script_flush()  # as after a Redis restart: EVALSHA fails, EVAL loads it again
        assert (await store.take("k", limit)).allowed
        assert not (await store.take("k", limit)).allowed
        assert store.errors == 0
    finally:
        await store.aclose()
        direct.close()


@pytest.mark.parametrize("fail_open", [True, False])
async def test_redis_killed_then_restarted(
    redis_server: RedisServer, fail_open: bool, caplog: pytest.LogCaptureFixture
) -> None:
    store = RedisStore(redis_server.url, timeout=0.05, fail_open=fail_open)
    limit = Limit.parse("1/h", burst=2)
    caplog.set_level(logging.WARNING, logger="lbapp.ratelimit")
    try:
        assert (await store.take("k", limit)).allowed
        redis_server.kill()
        during = [await store.take("k", limit) for _ in range(5)]
        assert all(d.error and d.allowed is fail_open for d in during)
        assert store.errors == 5
        assert dict(during[0].headers()) == {b"ratelimit-policy": b'"default";q=2;w=7200'}
        down = [r for r in caplog.records if "unavailable" in r.getMessage()]
        assert len(down) == 1  # once per outage, not per request
        assert ("allowing" if fail_open else "refusing") in down[0].getMessage()

        redis_server.start()  # same port, empty (no persistence)
        started = time.monotonic()

        async def answers() -> bool:
            return not (await store.take("k", limit)).error

        while not await answers():
            assert time.monotonic() - started < RETRY_INTERVAL + 10
            await asyncio.sleep(0.05)
        # Redis came back empty: a full bucket, one token of which the probe above took.
        assert [(await store.take("k", limit)).allowed for _ in range(2)] == [True, False]
        assert len([r for r in caplog.records if "answers again" in r.getMessage()]) == 1
    finally:
        await store.aclose()


async def test_slow_redis_times_out(redis_server: RedisServer) -> None:
    """A Redis busy for 1 s answers nothing within 50 ms: decided by the fail policy at once."""
    store = RedisStore(redis_server.url, timeout=0.05, fail_open=False)
    limit = Limit.parse("10/h")
    blocker = redis_sync.Redis.from_url(redis_server.url)
    try:
        assert (await store.take("k", limit)).allowed  # connected, script loaded
        sleeper = asyncio.create_task(asyncio.to_thread(blocker.execute_command, "DEBUG", "SLEEP", "1"))
        await asyncio.sleep(0.2)  # let DEBUG SLEEP reach the server first
        begun = time.monotonic()
        decision = await store.take("k", limit)
        elapsed = time.monotonic() - begun
        assert decision.error and not decision.allowed
        assert elapsed < 0.9  # did not wait for the busy server
        await sleeper
        # The abandoned command's late reply must not be read as a later command's answer.
        await poll(lambda: time.monotonic() - begun > RETRY_INTERVAL, seconds=5)
        after = [await store.take("k", limit) for _ in range(3)]
        assert not any(d.error for d in after)
        # 10 - the first take - these three; the timed-out take may have run once Redis woke up
        # (it was sent): then one fewer. Either way one count, in order: no reply was mixed up.
        assert [d.remaining for d in after] in ([8, 7, 6], [7, 6, 5])
    finally:
        await store.aclose()
        blocker.close()
