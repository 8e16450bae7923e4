"""uvicorn's WebSocket protocol with a graceful shutdown: sessions run on, then get 1001.

On SIGTERM uvicorn's own protocol closes every open WebSocket at once with 1012, without waiting
for `--timeout-graceful-shutdown`. nginx, HAProxy and Envoy let open sessions run while they
drain and close what is left when the drain time is over; this class does the same: an open
session keeps relaying until shortly before the graceful timeout, then gets a 1001 ("going
away") close, which the relay passes to the backend. Without a graceful timeout uvicorn waits for
sessions to end on their own. Selected with `uvicorn --ws lbapp.wsserver:GracefulWebSocketProtocol`.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol


def close_delay(graceful_timeout: float) -> float:
    """When to close open sessions: a second (at most half the time) before uvicorn's deadline,
    so the relay can still pass the close on before uvicorn cancels what is left."""
    return max(graceful_timeout - 1.0, graceful_timeout / 2)


class GracefulWebSocketProtocol(WebSocketsSansIOProtocol):
    going_away_timer: Any = None

    def shutdown(self) -> None:
        open_session = self.handshake_complete and self.initial_response is None
        if not open_session or self.close_sent or self.disconnected:
            super().shutdown()  # handshakes in progress get uvicorn's 500, closed ones are closed
            return
        timeout = self.config.timeout_graceful_shutdown
        if timeout is not None and self.going_away_timer is None:
            self.going_away_timer = self.loop.call_later(close_delay(timeout), self.going_away)

    def going_away(self) -> None:
        """Close with 1001 and tell the app, as uvicorn's shutdown does with 1012."""
        if self.close_sent or self.disconnected or self.transport.is_closing():
            return
        self.stop_keepalive()
        reason = "server shutting down"
        self.queue.put_nowait({"type": "websocket.disconnect", "code": 1001, "reason": reason})
        self.conn.send_close(1001, reason)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.going_away_timer is not None:
            self.going_away_timer.cancel()
        super().connection_lost(exc)
