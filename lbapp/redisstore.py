"""Rate-limit buckets in Redis, shared by every worker of every instance.

One round trip per request: a Lua script (run with EVALSHA, loaded with EVAL when Redis does
not know it yet, e.g. after a restart) reads the bucket, decides with Redis's own clock (`TIME`,
one clock for every instance) and writes it back with an expiry at the moment it is full again,
atomically. The script is `Limit.decide` transcribed.

Redis slow or down: after `timeout` seconds the request is decided by the fail policy (allowed,
or refused with 503); the outage is logged once, each request decided that way is counted
(`errors`), and for `RETRY_INTERVAL` seconds requests do not wait for Redis at all. Then one
request tries again; the first answer ends the outage (logged) without a restart.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from urllib.parse import urlsplit

import redis.asyncio as redis
from redis.exceptions import NoScriptError, RedisError

from .ratelimit import Decision, Limit

logger = logging.getLogger("lbapp.ratelimit")

RETRY_INTERVAL = 1.0  # seconds between attempts while Redis is down
MAX_CONNECTIONS = 64  # per worker; a request waits for one within its timeout
KEY_PREFIX = "lbapp:rl:"

# KEYS[1]: the bucket; ARGV[1]: seconds per token; ARGV[2]: seconds from empty to full.
# Returns {1 allowed | 0 refused, debt: seconds until full (after this request if allowed)}.
SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local epsilon = interval * 1e-9
local debt = (tonumber(redis.call('GET', KEYS[1])) or 0) - now
if debt < 0 or debt > capacity + epsilon then debt = 0 end
local after = debt + interval
if after > capacity + epsilon then
  return {0, string.format('%.17g', debt)}
end
redis.call('SET', KEYS[1], string.format('%.17g', now + after), 'PX', math.ceil(after * 1000))
return {1, string.format('%.17g', after)}
"""
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()


def describe(url: str) -> str:
    """The URL without its credentials, for logs."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"


class RedisStore:
    def __init__(self, url: str, timeout: float = 0.05, fail_open: bool = True) -> None:
        self.url = url
        self.timeout = timeout
        self.fail_open = fail_open
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=None,  # the wait for a connection is bounded by `timeout` below
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
        self.client = redis.Redis(connection_pool=pool)
        self.errors = 0  # requests decided by the fail policy
        self.down = False
        self.retry_at = 0.0

    async def take(self, key: str, limit: Limit) -> Decision:
        if self.down and time.monotonic() < self.retry_at:
            return self._unavailable(limit)
        self.retry_at = time.monotonic() + RETRY_INTERVAL  # one request probes at a time
        try:
            async with asyncio.timeout(self.timeout):
                allowed, debt = await self._run(KEY_PREFIX + key, limit)
        except (RedisError, OSError, TimeoutError) as exc:
            if not self.down:
                self.down = True
                logger.warning(
                    "rate limit store %s unavailable (%s); %s requests until it answers",
                    describe(self.url),
                    type(exc).__name__,
                    "allowing" if self.fail_open else "refusing (503)",
                )
            return self._unavailable(limit)
        if self.down:
            self.down = False
            logger.warning("rate limit store %s answers again", describe(self.url))
        return Decision(limit, bool(allowed), float(debt))

    async def _run(self, key: str, limit: Limit) -> list[bytes]:
        args = (key, repr(limit.interval), repr(limit.capacity))
        try:
            result = await self.client.evalsha(SCRIPT_SHA, 1, *args)
        except NoScriptError:
            result = await self.client.eval(SCRIPT, 1, *args)
        return list(result)

    def _unavailable(self, limit: Limit) -> Decision:
        self.errors += 1
        return Decision(limit, self.fail_open, 0.0, error=True)

    async def aclose(self) -> None:
        await self.client.aclose()
