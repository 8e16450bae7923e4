"""Logging that never blocks the event loop: records go through a queue to a writer thread."""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue

from .settings import Settings

_listener: logging.handlers.QueueListener | None = None


def configure_logging(settings: Settings) -> None:
    """Route the `lbapp` loggers through a queue; idempotent, so tests may build many apps."""
    global _listener
    root = logging.getLogger("lbapp")
    root.setLevel(logging.DEBUG if settings.debug else logging.INFO)
    logging.getLogger("lbapp.access").disabled = not settings.access_log
    # httpx logs every request at INFO: far too costly and noisy for a proxy.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if _listener is not None:
        return
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    stream = logging.StreamHandler()
    stream.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    _listener = logging.handlers.QueueListener(records, stream, respect_handler_level=True)
    _listener.start()
    atexit.register(_listener.stop)
    root.addHandler(logging.handlers.QueueHandler(records))
    root.propagate = False
