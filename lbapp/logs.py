"""Logging that never blocks the event loop: records are batched to a writer thread.

The event loop only builds a record and appends it to a list; the writer thread formats the
batch (text or JSON, `LB_LOG_FORMAT`) and writes it in one call. Access records carry their fields as a dict
(`record.access`) and are not even %-formatted on the loop.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import threading
import time
from collections import deque
from typing import Any


@functools.lru_cache(maxsize=4)
def utc_second(second: int) -> str:
    """One second as `2026-04-03T10:00:00`: formatted once, however many lines share it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def rfc3339(created: float) -> str:
    """UTC with milliseconds: 2026-04-03T10:00:00.123Z."""
    return utc_millisecond(int(created * 1000))


@functools.lru_cache(maxsize=8)
def utc_millisecond(ms: int) -> str:
    """At full load several lines share a millisecond: each is formatted once."""
    second, rest = divmod(ms, 1000)
    return f"{utc_second(second)}.{rest:03d}Z"


def access_line(
    created: float,
    client: str | None,
    method: str,
    path: str,
    status: int,
    backend: str | None,
    attempts: int,
    upstream_ms: float | None,
    total_ms: float,
    got: int,
    sent: int,
    request_id: str,
    rate_limit: str | None,
) -> str:
    """The text format's access line, read like nginx's, with key=value extras."""
    upstream = f"{upstream_ms:.1f}ms" if upstream_ms is not None else "-"
    line = (
        f'{rfc3339(created)} {client or "-"} "{method} {path}" {status} backend={backend or "-"}'
        f" attempts={attempts} upstream={upstream} total={total_ms:.1f}ms in={got} out={sent}"
        f" id={request_id}"
    )
    return f"{line} ratelimit={rate_limit}" if rate_limit else line


class TextFormatter(logging.Formatter):
    """`time level logger: message`; an access line reads like nginx's, with key=value extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: Any = record
        if type(entry) is RequestEntry:  # the proxy's hot path: one format, no dict
            return entry.text()
        access: dict[str, Any] | None = getattr(record, "access", None)
        if access is None:
            line = f"{rfc3339(record.created)} {record.levelname} {record.name}: {record.getMessage()}"
            if record.exc_info and not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
            return f"{line}\n{record.exc_text}" if record.exc_text else line
        a = access
        line = access_line(
            record.created, a["client"], a["method"], a["path"], a["status"], a["backend"],
            a["attempts"], a["upstream_ms"], a["total_ms"], a["bytes_in"], a["bytes_out"],
            a["request_id"], a.get("rate_limit"),
        )  # fmt: skip
        if "ws_close_code" in a:  # a WebSocket session, logged when it closed
            line += (
                f" ws_close={a['ws_close_code']} ws_ended_by={a['ws_ended_by']}"
                f" ws_messages={a['ws_messages_in']}/{a['ws_messages_out']}"
            )
        return line


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


class BatchingHandler(logging.Handler):
    """Collects records on the event loop; a writer thread formats and writes them in batches.

    A queue with one wake-up per record costs a thread switch (and a GIL hand-over) per request;
    here the loop only appends to a list, and the writer wakes every `interval` seconds (sooner
    when `high_water` records are waiting), formats the batch and writes it with one call.
    """

    def __init__(self, target: logging.Handler, interval: float = 0.05, high_water: int = 512) -> None:
        super().__init__()
        self.target = target
        self.interval = interval
        self.high_water = high_water
        self.pending: deque[logging.LogRecord] = deque()  # append/popleft are atomic
        self.wake = threading.Event()
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="lbapp-log-writer", daemon=True)
        self.thread.start()

    def handle(self, record: logging.LogRecord) -> bool:  # no lock: deque.append is atomic
        if self.stopped:  # closed: nothing would ever write it; never let the queue grow
            return False
        if record.exc_info and not record.exc_text and not hasattr(record, "access"):
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None  # tracebacks hold frames: render them now, not later
        self.pending.append(record)
        # Once per batch: setting an Event takes its lock and notifies, every time.
        if len(self.pending) >= self.high_water and not self.wake.is_set():
            self.wake.set()
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self.handle(record)

    def _run(self) -> None:
        while not self.stopped:
            self.wake.wait(self.interval)
            self.wake.clear()
            self.flush()

    def flush(self) -> None:
        pending = self.pending
        batch = [pending.popleft() for _ in range(len(pending))]
        if not batch:
            return
        stream = getattr(self.target, "stream", None)
        formatter = self.target.formatter or logging.Formatter()
        if stream is None:
            for record in batch:
                self.target.handle(record)
            return
        try:
            stream.write("".join(formatter.format(record) + "\n" for record in batch))
            stream.flush()
        except Exception:  # a closed or broken stream must not kill the writer
            pass

    def close(self) -> None:
        self.stopped = True
        self.wake.set()
        self.thread.join(timeout=2)
        self.flush()
        super().close()


class AccessEntry:
    """What the formatters read of a `LogRecord`, without building one.

    A `LogRecord` costs tens of microseconds (caller lookup, thread and process names): too much
    for one line per request. The access log hands these straight to the batching handler.
    """

    __slots__ = ("access", "created", "exc_info", "exc_text")
    levelname = "INFO"
    levelno = logging.INFO
    name = "lbapp.access"

    def __init__(self, access: dict[str, Any]) -> None:
        self.created = time.time()
        self.access = access
        self.exc_info = None
        self.exc_text = None

    def getMessage(self) -> str:
        return "access"


class RequestEntry:
    """A proxied request's access record as the proxy has its values: a tuple, made on the event
    loop with nothing formatted; the writer thread formats it (`text`, or `access` for JSON)."""

    __slots__ = ("created", "values")
    levelname = "INFO"
    levelno = logging.INFO
    name = "lbapp.access"
    exc_info = None
    exc_text = None

    def __init__(self, values: tuple[Any, ...]) -> None:
        self.created = time.time()
        # request id (bytes), client, method, path (bytes or str), status, backend, attempts,
        # seconds to the response head (or None), seconds in all, bytes in, bytes out, rate limit
        self.values = values

    @property
    def access(self) -> dict[str, Any]:
        rid, client, method, path, status, backend, attempts, upstream, total, got, sent, limit = self.values
        return {
            "request_id": rid.decode("latin-1"),
            "client": client,
            "method": method,
            "path": path.decode("latin-1") if isinstance(path, bytes) else path,
            "status": status,
            "backend": backend,
            "attempts": attempts,
            "upstream_ms": round(upstream * 1000, 3) if upstream is not None else None,
            "total_ms": round(total * 1000, 3),
            "bytes_in": got,
            "bytes_out": sent,
            "rate_limit": limit,
        }

    def text(self) -> str:
        """The text format's line (TextFormatter's), from the tuple."""
        rid, client, method, path, status, backend, attempts, upstream, total, got, sent, limit = self.values
        return access_line(
            self.created,
            client,
            method,
            path.decode("latin-1") if isinstance(path, bytes) else path,
            status,
            backend,
            attempts,
            upstream * 1000 if upstream is not None else None,
            total * 1000,
            got,
            sent,
            rid.decode("latin-1"),
            limit,
        )

    def getMessage(self) -> str:
        return "access"


def formatter_for(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else TextFormatter()


def find_batching_handler() -> BatchingHandler | None:
    """The writer installed on the `lbapp` logger by `configure_logging`, if any."""
    return next((h for h in logging.getLogger("lbapp").handlers if isinstance(h, BatchingHandler)), None)


def configure_logging(debug: bool = False, access_log: bool = True, log_format: str = "text") -> None:
    """Route the `lbapp` loggers through a batching writer; for entry points (idempotent).

    The app factory never calls this: `uvicorn lbapp:app` (lbapp/__init__.py), the launcher and
    tests each decide how the process logs.
    """
    root = logging.getLogger("lbapp")
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    logging.getLogger("lbapp.access").disabled = not access_log
    # httpx logs every request at INFO: far too costly and noisy for a proxy.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    handler = find_batching_handler()
    if handler is not None and handler.stopped:  # closed, e.g. by a later dictConfig: replace it
        root.removeHandler(handler)
        handler = None
    if handler is not None:
        handler.target.setFormatter(formatter_for(log_format))
        return
    stream = logging.StreamHandler()
    stream.setFormatter(formatter_for(log_format))
    handler = BatchingHandler(stream)
    atexit.register(handler.close)
    root.addHandler(handler)
    root.propagate = False
