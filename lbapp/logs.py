"""Logging that never blocks the event loop: records go through a queue to a writer thread.

The event loop only builds a record and puts it on the queue; the writer thread formats it (text
or JSON, `LB_LOG_FORMAT`) and writes it. Access records carry their fields as a dict
(`record.access`) and are not even %-formatted on the loop.
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import time
from typing import Any

from .settings import Settings

_listener: logging.handlers.QueueListener | None = None
_stream: logging.Handler | None = None

ACCESS_FIELDS = (
    "request_id",
    "client",
    "method",
    "path",
    "status",
    "backend",
    "attempts",
    "upstream_ms",
    "total_ms",
    "bytes_in",
    "bytes_out",
)


def rfc3339(created: float) -> str:
    """UTC with milliseconds: 2026-04-03T10:00:00.123Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


class TextFormatter(logging.Formatter):
    """`time level logger: message`; an access line reads like nginx's, with key=value extras."""

    def format(self, record: logging.LogRecord) -> str:
        access: dict[str, Any] | None = getattr(record, "access", None)
        if access is None:
            line = f"{rfc3339(record.created)} {record.levelname} {record.name}: {record.getMessage()}"
            if record.exc_info and not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
            return f"{line}\n{record.exc_text}" if record.exc_text else line
        a = access
        upstream = f"{a['upstream_ms']:.1f}ms" if a["upstream_ms"] is not None else "-"
        return (
            f'{rfc3339(record.created)} {a["client"] or "-"} "{a["method"]} {a["path"]}" {a["status"]}'
            f" backend={a['backend'] or '-'} attempts={a['attempts']} upstream={upstream}"
            f" total={a['total_ms']:.1f}ms in={a['bytes_in']} out={a['bytes_out']} id={a['request_id']}"
        )


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, then the access fields or `message`."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        access: dict[str, Any] | None = getattr(record, "access", None)
        if access is not None:
            document.update(access)
        else:
            document["message"] = record.getMessage()
            if record.exc_info:
                document["exception"] = self.formatException(record.exc_info)
            elif record.exc_text:
                document["exception"] = record.exc_text
        return json.dumps(document, ensure_ascii=False)


class LoopQueueHandler(logging.handlers.QueueHandler):
    """Leaves access records untouched (their dict is formatted by the writer thread)."""

    def prepare(self, record: logging.LogRecord) -> Any:
        if hasattr(record, "access"):
            return record
        return super().prepare(record)


def formatter_for(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else TextFormatter()


def configure_logging(settings: Settings) -> None:
    """Route the `lbapp` loggers through a queue; idempotent, so tests may build many apps."""
    global _listener, _stream
    root = logging.getLogger("lbapp")
    root.setLevel(logging.DEBUG if settings.debug else logging.INFO)
    logging.getLogger("lbapp.access").disabled = not settings.access_log
    # httpx logs every request at INFO: far too costly and noisy for a proxy.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if _listener is not None and _stream is not None:
        _stream.setFormatter(formatter_for(settings.log_format))
        return
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    _stream = logging.StreamHandler()
    _stream.setFormatter(formatter_for(settings.log_format))
    _listener = logging.handlers.QueueListener(records, _stream, respect_handler_level=True)
    _listener.start()
    atexit.register(_listener.stop)
    root.addHandler(LoopQueueHandler(records))
    root.propagate = False
