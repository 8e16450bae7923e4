"""DNS discovery: a backend given as `{"url": "http://echo:8000", "discovery": "dns"}` is every
A/AAAA record of its host, re-resolved every `LB_DNS_INTERVAL`.

That is how `docker compose up --scale echo=5` and a Kubernetes headless Service are followed:
each address becomes a backend (`http://<address>:8000`, sending `Host: echo:8000` when the
client's Host is not preserved); an address that appears joins after a passing health check, one
that vanishes drains and leaves (`Runtime.remove`). Names are resolved with the event loop's
`getaddrinfo` (in its thread pool: the loop never blocks, and the system resolver's own rules,
/etc/hosts and search domains, apply). A failed lookup keeps the last known addresses (nginx's
and Envoy's rule: a DNS outage must not empty a pool); a lookup that answers no address does too.
The resolver is injectable, so tests decide what a name resolves to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable
from urllib.parse import urlsplit, urlunsplit

from .runtime import Runtime

logger = logging.getLogger("lbapp.discovery")
Resolver = Callable[[str, int], Awaitable[list[str]]]


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def member_url(spec_url: str, address: str) -> str:
    """The backend URL of one address of a discovered name."""
    parts = urlsplit(spec_url)
    host = f"[{address}]" if ":" in address else address
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class Discovery:
    """The DNS-discovered backends of every route, kept in step with their names' records."""

    def __init__(self, runtime: Runtime, interval: float = 5.0, resolver: Resolver = system_resolver) -> None:
        self.runtime = runtime
        self.interval = interval
        self.resolver = resolver
        self.specs: dict[str, dict[str, int]] = {}  # route prefix -> {name URL: weight}
        self.members: dict[tuple[str, str], set[str]] = {}  # (prefix, name URL) -> backend URLs
        self._now: asyncio.Event | None = None

    def owns(self, prefix: str, url: str) -> bool:
        return any(url in urls for (p, _), urls in self.members.items() if p == prefix)

    def set_specs(self, prefix: str, specs: Iterable[tuple[str, int]]) -> None:
        """The names a route discovers (start-up, reload, another worker's change)."""
        wanted = dict(specs)
        for name in list(self.members):
            if name[0] == prefix and name[1] not in wanted:
                self._update(prefix, name[1], 0, [])  # the name left the configuration
                del self.members[name]
        if wanted:
            self.specs[prefix] = wanted
        else:
            self.specs.pop(prefix, None)
        for name_url, weight in wanted.items():
            for url in self.members.get((prefix, name_url), ()):
                cluster = self.runtime.clusters.get(prefix)
                backend = cluster.pool.find(url) if cluster else None
                if cluster is not None and backend is not None:
                    self.runtime.set_weight(cluster, backend, weight)
        if self._now is not None:
            self._now.set()

    def drop_route(self, prefix: str) -> None:
        """The route is gone (a reload): its backends went with it."""
        self.specs.pop(prefix, None)
        for name in [n for n in self.members if n[0] == prefix]:
            del self.members[name]

    def _update(self, prefix: str, name_url: str, weight: int, addresses: list[str]) -> None:
        cluster = self.runtime.clusters.get(prefix)
        if cluster is None:
            return
        wanted = {member_url(name_url, a) for a in addresses}
        known = self.members.setdefault((prefix, name_url), set())
        host_header = urlsplit(name_url).netloc.encode("ascii")
        for url in sorted(wanted - known):
            backend = cluster.pool.find(url)
            if backend is None:
                backend = cluster.pool.add(url, weight)
                backend.host_header = host_header
                self.runtime.health.wake()
            else:
                self.runtime.keep(cluster, backend)
            logger.info("%s: address %s joins route %s", name_url, url, prefix)
        for url in sorted(known - wanted):
            backend = cluster.pool.find(url)
            if backend is not None:
                self.runtime.remove(cluster, backend, f"no longer an address of {name_url}")
        known.clear()
        known.update(wanted)

    async def resolve(self, prefix: str, name_url: str, weight: int) -> None:
        parts = urlsplit(name_url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            addresses = await self.resolver(host, port)
        except (OSError, UnicodeError) as exc:
            logger.warning("resolving %s failed (%s); keeping its last known addresses", host, exc)
            return
        if not addresses:
            logger.warning("%s resolved to no address; keeping its last known ones", host)
            return
        if self.specs.get(prefix, {}).get(name_url) == weight:  # still wanted after the await
            self._update(prefix, name_url, weight, addresses)

    async def run_once(self) -> None:
        names = [(p, url, w) for p, specs in self.specs.items() for url, w in specs.items()]
        await asyncio.gather(*(self.resolve(*name) for name in names))

    async def run(self) -> None:
        """Resolve now, then every interval (or at once when the names change); cancelled on shutdown."""
        self._now = now = asyncio.Event()
        while True:
            try:
                await self.run_once()
            except Exception:
                logger.exception("DNS discovery round failed; next in %gs", self.interval)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await now.wait()
            now.clear()
