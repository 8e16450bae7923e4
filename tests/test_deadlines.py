"""Deadlines (lbapp/deadlines.py): many timeouts on one timer, fired within a tick of their time."""

from __future__ import annotations

import asyncio

from lbapp.deadlines import Deadlines


def test_due_entries_fire_and_discarded_ones_never_do() -> None:
    async def scenario() -> tuple[list[tuple[str, float]], float, int, bool]:
        loop = asyncio.get_running_loop()
        deadlines = Deadlines(loop, tick=0.01)
        fired: list[tuple[str, float]] = []
        start = loop.time()
        done = asyncio.Event()

        def note(key: str) -> None:
            fired.append((key, loop.time() - start))
            if len(fired) == 3:
                done.set()

        deadlines.add(0.05, "a", note)
        deadlines.add(0.05, "gone", note)
        deadlines.add(0.02, "b", note)  # a shorter timeout, added later, fires first
        deadlines.add(0.08, "c", note)
        deadlines.discard(0.05, "gone")
        await asyncio.wait_for(done.wait(), timeout=10)
        await asyncio.sleep(0.05)  # a few more ticks: nothing else may fire, and the timer stops
        return fired, loop.time() - start, len(deadlines), deadlines.armed

    fired, _, pending, armed = asyncio.run(scenario())
    assert [key for key, _ in fired] == ["b", "a", "c"]
    assert all(elapsed >= seconds for (_, elapsed), seconds in zip(fired, (0.02, 0.05, 0.08), strict=True))
    assert pending == 0 and not armed


def test_a_failing_callback_does_not_cost_the_others_their_deadline() -> None:
    async def scenario() -> list[str]:
        loop = asyncio.get_running_loop()
        deadlines = Deadlines(loop, tick=0.01)
        fired: list[str] = []
        done = asyncio.Event()

        def fail(key: str) -> None:
            raise RuntimeError(key)

        def note(key: str) -> None:
            fired.append(key)
            done.set()

        deadlines.add(0.01, "x", fail)
        deadlines.add(0.01, "y", note)
        await asyncio.wait_for(done.wait(), timeout=10)
        return fired

    assert asyncio.run(scenario()) == ["y"]
