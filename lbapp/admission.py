"""The circuit breaker's waiting room: a bounded FIFO queue of requests waiting for a free slot.

A pool with `max_conns` lets a request that finds every candidate at its cap wait here, in
arrival order, until a slot is released or the pool changes; past `size` waiters or `timeout`
seconds the request is refused (the proxy answers 503 with Retry-After).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import TypeVar


class Full:
    """The answer of a pick when every candidate is at the pool's `max_conns`."""


FULL = Full()
T = TypeVar("T")


class WaitQueue:
    """Waiters woken one at a time; each woken waiter that finds a slot wakes the next."""

    def __init__(self, size: int = 100, timeout: float = 1.0) -> None:
        self.size = size
        self.timeout = timeout
        self.waiters: deque[asyncio.Future[None]] = deque()

    def __len__(self) -> int:
        return len(self.waiters)

    def wake_one(self) -> None:
        """A slot was released (or the candidates changed): let the first waiter look again."""
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def wait(self, pick: Callable[[], T | Full]) -> T | Full:
        """Wait until `pick` finds something other than FULL; FULL if the queue is full or time runs out."""
        waiters = self.waiters
        if len(waiters) >= self.size:
            return FULL
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        first = True
        while True:
            waiter: asyncio.Future[None] = loop.create_future()
            if first:
                waiters.append(waiter)
            else:
                waiters.appendleft(waiter)  # woken but beaten to the slot: keep its place
            first = False
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError:
                if waiter.done() and not waiter.cancelled():
                    self.wake_one()  # woken just as time ran out: pass the free slot on
                return FULL
            finally:
                if not waiter.done():
                    waiter.cancel()
                    with contextlib.suppress(ValueError):
                        waiters.remove(waiter)
            choice = pick()
            if not isinstance(choice, Full):
                # Maybe more than one slot is free (or the candidates changed): wake the next
                # waiter too; one that finds nothing goes back to the front, so order is kept.
                self.wake_one()
                return choice
