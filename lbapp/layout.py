"""The pool layout, and how every worker of one lbapp shares it.

A layout is what a reload or the admin API changes: per route, its policy and its backends with
their weights and whether an operator drained them. `Reloader.apply` makes the live clusters match
one (reload.py).

With several workers (`--workers N`, `PROMETHEUS_MULTIPROC_DIR` set) each is its own process with
its own pools, so a change made in one must reach the others: the worker that made it writes the
layout to `lbapp-layout.json` in the multiprocess directory (atomically: a new file renamed over
the old one, a version number one higher, under a file lock), and every worker polls that file
every `POLL` seconds and applies a newer version. A worker started while others run (uvicorn
replaces a dead one) applies the file before it serves, so it starts from the current layout, not
the config file's first version, unless the configuration it loaded differs from the one the file
was derived from: then it is the newer one (uvicorn's rolling restart on SIGHUP) and it publishes
it. The first worker of a new start (no other live worker in multiproc.py's registry) publishes its
configuration: a restart starts from the configuration. Health, in-flight counts and ejections stay
each worker's own (each checks its backends). The file belongs to one lbapp instance, as the
multiprocess directory does: instances on other hosts share nothing, and an admin change is made
on each (as with HAProxy's runtime API); a reload of a configuration they share reaches all.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .cluster import Clusters
from .discovery import Discovery
from .settings import BackendSpec, Settings

logger = logging.getLogger("lbapp.layout")
POLL = 0.25  # seconds between two looks at the shared file: a change reaches every worker in time


@dataclass(frozen=True, slots=True)
class Member:
    url: str
    weight: int
    drained: bool | None = None  # None (a reload): keep whatever an operator set
    discovery: str | None = None  # "dns": a name whose addresses each worker resolves itself


@dataclass(frozen=True, slots=True)
class RouteLayout:
    prefix: str
    algorithm: str
    strip_prefix: bool
    members: tuple[Member, ...]


Layout = list[RouteLayout]


def from_settings(settings: Settings) -> Layout:
    """The layout a configuration asks for (the default route first)."""

    def members(specs: list[BackendSpec]) -> tuple[Member, ...]:
        return tuple(Member(b.url, b.weight, discovery=b.discovery) for b in specs)

    default = RouteLayout("/", settings.algorithm, False, members(settings.backends))
    routes = [
        RouteLayout(r.prefix, r.algorithm or settings.algorithm, r.strip_prefix, members(r.backends))
        for r in settings.routes
    ]
    return [default, *routes]


def from_clusters(clusters: Clusters, leaving: Callable[[Any], bool], discovery: Discovery) -> Layout:
    """The live layout; backends on their way out (`leaving`) are not part of it, and discovered
    ones are their name (every worker resolves it)."""
    layout = []
    for c in clusters:
        static = [b for b in c.pool.backends if not leaving(b) and not discovery.owns(c.prefix, b.url)]
        names = discovery.specs.get(c.prefix, {}).items()
        members = [Member(b.url, b.weight, b.draining) for b in static]
        members += [Member(url, weight, discovery="dns") for url, weight in names]
        layout.append(RouteLayout(c.prefix, c.algorithm, c.strip_prefix, tuple(members)))
    return layout


def digest(settings: Settings) -> str:
    """Which configuration a layout was derived from."""
    text = json.dumps([asdict(r) for r in from_settings(settings)], sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def parse(document: Any) -> Layout:
    return [
        RouteLayout(r["prefix"], r["algorithm"], r["strip_prefix"], tuple(Member(**m) for m in r["members"]))
        for r in document["routes"]
    ]


class SharedLayout:
    """This worker's side of the shared layout file."""

    def __init__(self, directory: str, config_digest: str, apply: Callable[[Layout], None]) -> None:
        self.path = Path(directory) / "lbapp-layout.json"
        self.config_digest = config_digest
        self.apply = apply
        self.version = 0  # of the layout this worker has
        self.seen: tuple[int, int, int] | None = None  # the file's (inode, size, mtime) last read

    def _read(self) -> dict[str, Any] | None:
        try:
            stat = self.path.stat()
            document: dict[str, Any] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        self.seen = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        return document

    def start(self, current: Layout, others_running: bool) -> None:
        """At start-up (after registering as a worker): take the instance's current layout, or
        publish ours if we are the first worker or our configuration is newer."""
        document = self._read() if others_running else None
        if document is not None and document.get("config") == self.config_digest:
            try:
                layout = parse(document)
            except (KeyError, TypeError, ValueError):
                logger.warning("ignoring the unreadable shared layout %s", self.path)
            else:
                self.version = int(document["version"])
                self.apply(layout)
                logger.info("started from the shared layout, version %d", self.version)
                return
        self.publish(current)

    def publish(self, layout: Layout) -> None:
        """A change made here: write it for the other workers (a small file, rarely)."""
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            document = self._read()
            version = max(int(document["version"]) if document else 0, self.version) + 1
            temporary = self.path.with_suffix(f".{os.getpid()}.tmp")
            routes = [asdict(r) for r in layout]
            temporary.write_text(
                json.dumps({"version": version, "config": self.config_digest, "routes": routes})
            )
            os.replace(temporary, self.path)
            self.version = version
            self._read()

    def poll(self) -> None:
        """Apply the file if another worker wrote a newer version since the last look."""
        with contextlib.suppress(OSError):
            stat = self.path.stat()
            if (stat.st_ino, stat.st_size, stat.st_mtime_ns) == self.seen:
                return
        document = self._read()
        if document is None or int(document.get("version", 0)) <= self.version:
            return
        try:
            layout = parse(document)
        except (KeyError, TypeError, ValueError):
            logger.warning("ignoring the unreadable shared layout %s", self.path)
            return
        self.version = int(document["version"])
        self.config_digest = str(document.get("config", self.config_digest))
        self.apply(layout)

    async def follow(self) -> None:
        while True:
            await asyncio.sleep(POLL)
            try:
                self.poll()
            except Exception:
                logger.exception("applying the shared layout failed; trying again")
