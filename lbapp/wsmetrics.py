"""WebSocket sessions in the metrics: open sessions, sessions, messages and bytes, durations.

The relay counts messages and bytes on its own `Session` (plain ints, nothing shared per message);
`WebSocketStats` keeps the open sessions and reads their counters at scrape time, adding those
of closed sessions to totals, so the counters are live without any per-message bookkeeping here.
Its families join the others through `Stats.sources`.
"""

from __future__ import annotations

from typing import Any, Protocol

from .backend import Backend
from .metrics import Family, Histogram

# Session durations: 1 s to 4 h.
SESSION_BUCKETS = (1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)
SESSION_BUCKET_LABELS = (*(repr(b) for b in SESSION_BUCKETS), "+Inf")
DIRECTIONS = ("client_to_backend", "backend_to_client")  # the `direction` label


class Relayed(Protocol):
    """What `WebSocketStats` reads of one WebSocket session (see `websocket.Session`)."""

    messages_in: int  # client -> backend
    messages_out: int
    bytes_in: int
    bytes_out: int


class WebSocketStats:
    """WebSocket sessions: the open ones, whose counters are read live at scrape time (nothing is
    added per message here), and the totals of the closed ones, by (route, backend)."""

    __slots__ = ("bytes", "durations", "messages", "open", "sessions")

    def __init__(self) -> None:
        self.open: dict[Relayed, tuple[str, str]] = {}
        self.sessions: dict[tuple[str, str], int] = {}  # accepted
        self.messages: dict[tuple[str, str, str], int] = {}  # (route, backend, direction), closed ones
        self.bytes: dict[tuple[str, str, str], int] = {}
        self.durations: dict[tuple[str, str], Histogram] = {}

    def opened(self, backend: Backend, session: Relayed) -> None:
        label = (backend.route, backend.url)
        self.open[session] = label
        self.sessions[label] = self.sessions.get(label, 0) + 1

    def closed(self, session: Relayed, seconds: float) -> None:
        label = self.open.pop(session)
        self._add(self.messages, label, session.messages_in, session.messages_out)
        self._add(self.bytes, label, session.bytes_in, session.bytes_out)
        histogram = self.durations.get(label)
        if histogram is None:
            histogram = self.durations[label] = Histogram(SESSION_BUCKETS)
        histogram.observe(seconds)

    @staticmethod
    def _add(
        totals: dict[tuple[str, str, str], int], label: tuple[str, str], inward: int, outward: int
    ) -> None:
        for direction, value in zip(DIRECTIONS, (inward, outward), strict=True):
            key = (*label, direction)
            totals[key] = totals.get(key, 0) + value

    def families(self, labels: list[tuple[str, str]]) -> list[Family]:
        by = ("route", "backend")
        connections = dict.fromkeys(labels, 0)
        messages, sizes = dict(self.messages), dict(self.bytes)
        for session, label in self.open.items():
            connections[label] = connections.get(label, 0) + 1
            self._add(messages, label, session.messages_in, session.messages_out)
            self._add(sizes, label, session.bytes_in, session.bytes_out)
        durations: dict[tuple[str, ...], Any] = {k: (h.counts, h.sum) for k, h in self.durations.items()}
        return [
            Family("lb_websocket_connections", "Open WebSocket sessions.", "gauge", by, "livesum",
                   {k: v for k, v in connections.items()}),
            Family("lb_websocket_sessions", "WebSocket sessions accepted (the backend answered 101).",
                   "counter", by, samples={k: v for k, v in self.sessions.items()}),
            Family("lb_websocket_messages", "WebSocket messages relayed, by direction.", "counter",
                   (*by, "direction"), samples={k: v for k, v in messages.items()}),
            Family("lb_websocket_bytes", "WebSocket message payload bytes relayed, by direction.",
                   "counter", (*by, "direction"), samples={k: v for k, v in sizes.items()}),
            Family("lb_websocket_duration_seconds", "Duration of closed WebSocket sessions.",
                   "histogram", by, samples=durations, buckets=SESSION_BUCKET_LABELS),
        ]  # fmt: skip
