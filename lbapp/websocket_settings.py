"""The WebSocket settings (issue 13): the relay's limits, read by `wsupstream.WebSocketConfig`.

A base class of `Settings` (lbapp/settings.py), as `ServerSettings` is, so these are `LB_*`
variables like every other setting, from the same sources and failing start-up the same way; they
live here because only the WebSocket modules and the launcher (uvicorn's `ws_max_size`) read them.
See the README's WebSocket section.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator, Field
from pydantic_settings import BaseSettings

from .config import parse_duration, parse_size

SecondsOrZero = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]


class WebSocketSettings(BaseSettings):
    """Fields of `Settings` for WebSocket sessions; field `x` is the variable `LB_X`."""

    # --- websocket ---
    # Largest message relayed either way, in bytes (`64KiB`, `16MiB` accepted); the launcher sets
    # uvicorn's client-side limit to it.
    websocket_max_message: Annotated[int, BeforeValidator(parse_size), Field(ge=1, le=2**31)] = 16 * 2**20
    # Close a session that carried no message either way for this long, with 1001; 0: never.
    websocket_idle_timeout: SecondsOrZero = 0.0
    # Keepalive pings to the backend (a silent dead backend is found within two intervals); 0: none.
    websocket_ping_interval: SecondsOrZero = 20.0
