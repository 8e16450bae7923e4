"""Active health checks: probe every backend each interval; the pool applies rise/fall.

The loop must never die: an exception in one round is logged and the next round runs, because
a dead health loop silently freezes every backend's state (see the field notes).
"""

from __future__ import annotations

import asyncio
import logging

import httpx

from .pool import Backend, Pool
from .settings import Settings

logger = logging.getLogger("lbapp.health")


class HealthChecker:
    """Probes `GET <backend><health_path>` on every backend concurrently, with its own client."""

    def __init__(self, pool: Pool, settings: Settings) -> None:
        self.pool = pool
        self.path = settings.health_path
        self.interval = settings.health_interval
        self.timeout = settings.health_timeout
        self.client: httpx.AsyncClient | None = None
        self.rounds = 0

    async def check(self, backend: Backend) -> None:
        assert self.client is not None
        url = backend.origin.copy_with(raw_path=backend.base_path + self.path.encode())
        try:
            response = await self.client.get(url)
        except httpx.HTTPError as exc:
            self.pool.record_check(backend, False, f"{type(exc).__name__}: {exc}".rstrip(": "))
            return
        ok = 200 <= response.status_code < 400
        self.pool.record_check(backend, ok, f"status {response.status_code}")

    async def run_once(self) -> None:
        await asyncio.gather(*(self.check(b) for b in self.pool.backends))
        self.rounds += 1

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
            while True:
                try:
                    await self.run_once()
                except Exception:
                    logger.exception("health check round failed; next round in %.1fs", self.interval)
                await asyncio.sleep(self.interval)
