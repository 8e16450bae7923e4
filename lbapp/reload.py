"""Configuration reloads: SIGHUP, or saving the `LB_CONFIG` file with `LB_CONFIG_WATCH=true`.

A reload reads the settings again from every source (environment, settings.env, LB_CONFIG) and
validates them completely first: an invalid configuration leaves the running one in place, logs
the one-line error naming the field and counts `lb_config_reloads_total{result="error"}`. A valid
one is applied to the pool layout (`LB_BACKENDS`, `LB_ALGORITHM`, `LB_ROUTES`) in one synchronous
step on the event loop (`Reloader.apply`), through `Runtime`: backends present before and after
are the same objects (health, in-flight, EWMA, ejection and counters kept); removed ones drain;
new ones join after a passing health check. Other settings (timeouts, health-check rules, ...)
are read at start-up only: a reload that changes one says so in the log and keeps the old value.

Several workers: each worker reloads itself on SIGHUP. uvicorn's own master answers SIGHUP by
replacing every worker (new processes, new state); the launcher's master (cli.Supervisor)
forwards the signal to the workers instead (`forward_sighup`), so they reload in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .cluster import Cluster, build_cluster
from .discovery import Discovery
from .layout import Layout, Member, SharedLayout, digest, from_settings
from .metrics import Family
from .ratelimit import carry_limiters
from .runtime import Runtime, drop_series
from .settings import Settings, SettingsError, load_settings

logger = logging.getLogger("lbapp.reload")
LAYOUT = frozenset({"backends", "algorithm", "routes"})  # what a reload applies


class Reloader:
    """Reloads this process's configuration into its live clusters."""

    def __init__(
        self,
        runtime: Runtime,
        settings: Settings,
        sticky_secret: bytes,
        load: Callable[[], Settings] = load_settings,
    ) -> None:
        self.runtime = runtime
        self.settings = settings  # the start-up settings: pool rules for new routes come from them
        self.sticky_secret = sticky_secret
        self.load = load
        self.shared: SharedLayout | None = None  # with several workers (layout.py)
        self.discovery = Discovery(runtime)  # application.py sets the configured one
        self.results = {"success": 0, "error": 0}  # lb_config_reloads_total (this worker's)
        self.last_reload = 0.0  # Unix time of the last successful reload (0: none yet)

    def families(self, labels: object = None) -> list[Family]:
        """This process's reload metrics (a `Stats.sources` entry)."""
        return [
            Family("lb_config_reloads", "Configuration reloads by result (error: the old one stayed).",
                   "counter", ("result",), samples={(r,): n for r, n in self.results.items()}),
            Family("lb_config_last_reload_timestamp_seconds", "Unix time of the last successful "
                   "configuration reload (0: none).", "gauge", (), "max", {(): self.last_reload}),
        ]  # fmt: skip

    def reload(self, why: str = "SIGHUP") -> bool:
        """Read, validate and apply the configuration; False (and the old one kept) if invalid."""
        try:
            new = self.load()
        except SettingsError as exc:
            self.results["error"] += 1
            logger.error("configuration reload (%s) failed, keeping the running configuration: %s", why, exc)
            return False
        self.apply(from_settings(new))
        if self.shared is not None:
            self.shared.config_digest = digest(new)
        self.runtime.changed()
        self.results["success"] += 1
        self.last_reload = time.time()
        ignored = [
            f"LB_{name.upper()}"
            for name in type(new).model_fields
            if name not in LAYOUT and getattr(new, name) != getattr(self.settings, name)
        ]
        if ignored:
            logger.warning(
                "configuration reloaded (%s); %s changed but apply at restart only", why, ", ".join(ignored)
            )
        else:
            logger.info("configuration reloaded (%s)", why)
        return True

    def apply(self, layout: Layout) -> None:
        """Make the live clusters match `layout`: no await, so no request sees half of it."""
        runtime, clusters = self.runtime, self.runtime.clusters
        kept: list[Cluster] = []
        for route in layout:
            prefix, algorithm, strip = route.prefix, route.algorithm, route.strip_prefix
            cluster = build_cluster(self.settings, self.sticky_secret, prefix, [], algorithm, strip)
            old = clusters.get(prefix)
            if old is not None and old.algorithm == algorithm and old.strip_prefix == strip:
                cluster = old
            elif old is not None:
                cluster.pool = old.pool  # a new policy over the same backends
            self.reconcile(cluster, route.members)
            kept.append(cluster)
        prefixes = {c.prefix for c in kept}
        for gone in clusters:
            if gone.prefix not in prefixes:
                self.discovery.drop_route(gone.prefix)
                for backend in list(gone.pool.backends):  # in-flight requests finish on their own
                    task = runtime.removing.pop(backend, None)
                    if task is not None:
                        task.cancel()
                    drop_series(runtime.stats, backend)
                    runtime.health.forget(backend)
        carry_limiters(clusters, kept, self.settings)
        clusters.replace(kept[0], kept[1:])
        for route in layout:
            names = [(m.url, m.weight) for m in route.members if m.discovery == "dns"]
            self.discovery.set_specs(route.prefix, names)
        runtime.health.pools = [c.pool for c in clusters]
        runtime.health.wake()

    def reconcile(self, cluster: Cluster, members: Sequence[Member]) -> None:
        runtime, pool, prefix = self.runtime, cluster.pool, cluster.prefix
        wanted = {member.url: member for member in members if member.discovery is None}
        for backend in list(pool.backends):
            member = wanted.get(backend.url)
            if member is None and self.discovery.owns(prefix, backend.url):
                continue  # the name's records decide
            if member is None:
                runtime.remove(cluster, backend, "removed from the configuration")
                continue
            runtime.keep(cluster, backend)
            runtime.set_weight(cluster, backend, member.weight)
            if member.drained is not None and member.drained != backend.draining:
                (pool.drain if member.drained else pool.undrain)(backend, "changed in another worker")
        for member in wanted.values():
            if pool.find(member.url) is None:
                backend = pool.add(member.url, member.weight)
                if member.drained:
                    pool.drain(backend, "drained in another worker")


async def watch_config(target: Path, reloader: Reloader, stop: asyncio.Event) -> None:
    """`LB_CONFIG_WATCH`: reload whenever the file (an absolute path) is written or replaced (an
    editor's save renames a new file over it, so its directory is watched)."""
    from watchfiles import awatch

    async for _ in awatch(
        target.parent,
        watch_filter=lambda change, changed: Path(changed) == target,
        debounce=200,
        stop_event=stop,
        recursive=False,
    ):
        reloader.reload(f"{target} changed")


def listen_for_sighup(reloader: Reloader) -> Callable[[], None]:
    """Reload on SIGHUP; returns the undo. Only the main thread can (tests run the app elsewhere)."""
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGHUP, reloader.reload, "SIGHUP")
    except (ValueError, RuntimeError, NotImplementedError):
        return lambda: None

    def undo() -> None:
        loop.remove_signal_handler(signal.SIGHUP)

    return undo


def forward_sighup(workers: Iterable[Any]) -> None:
    """The launcher's SIGHUP in the master (cli.Supervisor): every worker reloads in place."""
    logger.info("SIGHUP: every worker reloads its configuration")
    for process in workers:
        if process.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGHUP)
