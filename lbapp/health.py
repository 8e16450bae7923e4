"""Active health checks: probe every backend when it is due; the pool applies rise/fall.

Each backend has its own next-due time: `LB_HEALTH_INTERVAL` while its checks pass,
`LB_HEALTH_UNHEALTHY_INTERVAL` while they fail (to notice a recovery sooner), each stretched or
shortened by a random `LB_HEALTH_JITTER` share so many instances' checks do not align. Every round
probes all due backends concurrently with the checker's own client.

The loop must never die: an exception in one round is logged and the next round runs, because
a dead health loop silently freezes every backend's state while uvicorn keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Iterable

import httpx

from .backend import Backend
from .pool import Pool

logger = logging.getLogger("lbapp.health")


class HealthChecker:
    """Probes every backend of every pool (`http`: method + path + expected status/body; `tcp`:
    connect, close); each pool applies its own rise/fall thresholds."""

    def __init__(
        self,
        pools: Iterable[Pool],
        *,
        kind: str = "http",
        path: str = "/health",
        method: str = "GET",
        expected: Iterable[int] = range(200, 400),
        body: str = "",
        interval: float = 10.0,
        unhealthy_interval: float = 0.0,
        jitter: float = 0.1,
        timeout: float = 3.0,
        rng: random.Random | None = None,
    ) -> None:
        self.pools = list(pools)
        self.kind = kind
        self.path = path
        self.method = method
        self.expected = frozenset(expected)
        self.body = body.encode()
        self.interval = interval
        self.unhealthy_interval = unhealthy_interval or interval
        self.jitter = jitter
        self.timeout = timeout
        self.rng = rng or random.Random()
        self.client: httpx.AsyncClient | None = None
        self.rounds = 0
        self.due: dict[Backend, float] = {}  # loop time of each backend's next check
        self._wake: asyncio.Event | None = None

    def wake(self) -> None:
        """A backend was added: check it now rather than at the next due time."""
        if self._wake is not None:
            self._wake.set()

    def forget(self, backend: Backend) -> None:
        self.due.pop(backend, None)

    async def probe_http(self, backend: Backend) -> tuple[bool, str]:
        assert self.client is not None
        url = backend.origin.copy_with(raw_path=backend.base_path + self.path.encode())
        try:
            response = await self.client.request(self.method, url)
        except httpx.HTTPError as exc:
            return False, f"{type(exc).__name__}: {exc}".rstrip(": ")
        status = response.status_code
        if status not in self.expected:
            return False, f"status {status}"
        if self.body and self.body not in response.content:
            return False, f"status {status} but the body lacks {self.body.decode(errors='replace')!r}"
        return True, f"status {status}"

    async def probe_tcp(self, backend: Backend) -> tuple[bool, str]:
        origin = backend.origin
        port = origin.port or (443 if origin.scheme == "https" else 80)
        try:
            async with asyncio.timeout(self.timeout):
                _, writer = await asyncio.open_connection(origin.host, port)
        except (OSError, TimeoutError) as exc:
            return False, f"connect failed: {type(exc).__name__}: {exc}".rstrip(": ")
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        return True, "connected"

    async def check(self, pool: Pool, backend: Backend) -> None:
        started = asyncio.get_running_loop().time()
        try:
            if self.kind == "tcp":
                ok, reason = await self.probe_tcp(backend)
            else:
                ok, reason = await self.probe_http(backend)
        except Exception as exc:  # a bug in one probe must not cost the round
            ok, reason = False, f"{type(exc).__name__}: {exc}"
        pool.record_check(backend, ok, reason)
        self.due[backend] = started + self.next_interval(backend)

    def next_interval(self, backend: Backend) -> float:
        interval = self.interval if backend.check_ok else self.unhealthy_interval
        if self.jitter:
            interval *= 1.0 + self.rng.uniform(-self.jitter, self.jitter)
        return interval

    async def run_once(self) -> None:
        """Probe every backend that is due, concurrently."""
        now = asyncio.get_running_loop().time()
        due = []
        for pool in self.pools:
            pool.expire_ejections()  # the safety net of the pool's un-ejection timers
            due += [(pool, b) for b in pool.backends if self.due.get(b, 0.0) <= now]
        await asyncio.gather(*(self.check(pool, b) for pool, b in due))
        self.rounds += 1

    def pause(self) -> float:
        """Seconds until the next backend is due."""
        now = asyncio.get_running_loop().time()
        next_due = min(self.due.values(), default=now + self.interval)
        return max(next_due - now, 0.005)

    async def run(self) -> None:
        """Check forever; cancelled by the lifespan on shutdown."""
        async with httpx.AsyncClient(
            timeout=self.timeout,
            trust_env=False,
            follow_redirects=False,
            headers={"user-agent": "lbapp-health"},
            limits=httpx.Limits(max_keepalive_connections=0),
        ) as client:
            self.client = client
            self._wake = wake = asyncio.Event()
            while True:
                try:
                    await self.run_once()
                except Exception:
                    logger.exception("health check round failed; next round in %.1fs", self.interval)
                    await asyncio.sleep(self.interval)
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.pause()):
                        await wake.wait()
                wake.clear()
