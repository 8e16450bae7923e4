"""Draining before shutdown: `/lb-ready` fails first, the server stops accepting only later.

An outer balancer (Kubernetes, an AWS target group, HAProxy) learns that an instance is going away
from its readiness probe; until the probe fails and the balancer acts, it keeps sending new
connections. Stopping to accept at once on SIGTERM (uvicorn's default) turns those into refused
connections. With `LB_SHUTDOWN_DELAY` set, SIGTERM (or SIGINT) makes `/lb-ready` answer 503 at
once, connections are still accepted and served for that many seconds, and only then is uvicorn's
own exit handler called: it stops accepting, lets requests in flight finish (bounded by
`--timeout-graceful-shutdown`) and runs the lifespan's shutdown. A second signal during the delay
cuts it short.

The hook works with a plain `uvicorn lbapp:app`: uvicorn installs its handlers (`Server.handle_exit`)
with `signal.signal` before it runs the lifespan, so the lifespan wraps whatever handler is in
place and puts it back on shutdown. Signals reach only the main thread: an app served from another
thread (the tests' `ThreadedServer`) is drained by calling `begin` itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

logger = logging.getLogger("lbapp")

SIGNALS = (signal.SIGTERM, signal.SIGINT)
Handler = Callable[[int, FrameType | None], Any]


class Drain:
    """The process's readiness and the delayed hand-over of SIGTERM/SIGINT to the server."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.draining = False  # /lb-ready answers 503 from the first signal on
        self._loop: asyncio.AbstractEventLoop | None = None
        self._originals: dict[int, Any] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._pending: list[tuple[Handler, int]] = []

    def install(self) -> None:
        """Wrap the server's handlers of SIGTERM and SIGINT (from the lifespan, in the main thread)."""
        self._loop = asyncio.get_running_loop()
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            current = signal.getsignal(sig)
            if callable(current):  # uvicorn's Server.handle_exit; leave SIG_DFL/SIG_IGN alone
                self._originals[sig] = current
                signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        """Put the server's handlers back (lifespan shutdown), so uvicorn restores its own state."""
        for sig, handler in self._originals.items():
            with contextlib.suppress(ValueError):
                if signal.getsignal(sig) == self._on_signal:
                    signal.signal(sig, handler)
        self._originals.clear()
        if self._timer is not None:
            self._timer.cancel()

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        handler = self._originals.get(sig)
        if handler is None:  # pragma: no cover - only installed for the signals it wraps
            return
        if self.draining or self.delay <= 0 or self._loop is None or self._loop.is_closed():
            self.draining = True
            self._flush()
            handler(sig, frame)  # a second signal, or no delay: the server exits now
            return
        self._pending.append((handler, sig))
        # A signal handler may interrupt the loop anywhere: hand over through the thread-safe door.
        self._loop.call_soon_threadsafe(self.begin)

    def begin(self, exit: Callable[[], Any] | None = None) -> None:
        """Start draining: not ready from now on; `exit` (or the server's handler) after the delay."""
        if self._timer is not None:
            return
        self.draining = True
        if exit is not None:
            self._pending.append((lambda sig, frame: exit(), 0))
        logger.warning("draining: /lb-ready answers 503; stopping to accept in %.1fs", self.delay)
        loop = self._loop or asyncio.get_running_loop()
        self._timer = loop.call_later(self.delay, self._flush)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        for handler, sig in pending:
            handler(sig, None)
