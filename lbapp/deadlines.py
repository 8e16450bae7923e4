"""Many timeouts, one timer: the hot path's deadlines without a timer handle each.

Almost every timeout on a proxied request is cancelled within a millisecond (the backend answers,
the client stays), yet `loop.call_later` allocates a timer handle and a libuv timer for each and
frees both on `cancel`: profiled, ~4% of a request's CPU for the read timeout and the disconnect
watch. `Deadlines` keeps them in dicts instead, one per timeout length (so each dict is in deadline
order, by insertion), and one timer, armed only while something is pending, fires what is due every
`tick`. A deadline fires between its time and one tick later; an entry removed before is free.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable
from typing import Any

logger = logging.getLogger("lbapp.deadlines")

TICK = 0.05  # seconds: the resolution of these deadlines


class Deadlines:
    """Deadlines by timeout length, fired by one timer (module docstring)."""

    __slots__ = ("armed", "groups", "loop", "tick")

    def __init__(self, loop: asyncio.AbstractEventLoop, tick: float = TICK) -> None:
        self.loop = loop
        self.tick = tick
        # seconds -> {key: (due, callback)}, in insertion order = deadline order within a group
        self.groups: dict[float, dict[Hashable, tuple[float, Callable[[Any], None]]]] = {}
        self.armed = False

    def add(self, seconds: float, key: Hashable, callback: Callable[[Any], None]) -> None:
        """Call `callback(key)` once `seconds` have passed, unless `discard` came first."""
        group = self.groups.get(seconds)
        if group is None:
            group = self.groups[seconds] = {}
        group[key] = (self.loop.time() + seconds, callback)
        if not self.armed:
            self.armed = True
            self.loop.call_later(self.tick, self._fire)

    def discard(self, seconds: float, key: Hashable) -> None:
        group = self.groups.get(seconds)
        if group is not None:
            group.pop(key, None)

    def __len__(self) -> int:
        return sum(len(group) for group in self.groups.values())

    def _fire(self) -> None:
        now = self.loop.time()
        due: list[tuple[Callable[[Any], None], Hashable]] = []
        for seconds, group in list(self.groups.items()):
            while group:
                key = next(iter(group))
                when, callback = group[key]
                if when > now:
                    break
                del group[key]
                due.append((callback, key))
            if not group:
                del self.groups[seconds]  # recreated by the next `add` of that length
        if self.groups:
            self.loop.call_later(self.tick, self._fire)
        else:
            self.armed = False
        for callback, key in due:
            try:
                callback(key)
            except Exception:  # one failing callback must not cost the others their deadline
                logger.exception("deadline callback %r failed", callback)
