"""The settings of the launcher and its HTTP protocol: where lbapp listens, and what a client may
cost before its request reaches the app.

A base class of `Settings` (lbapp/settings.py), so these are `LB_*` variables like every other
setting, read from the same sources and failing start-up the same way; they live here because only
the launcher (lbapp/cli.py) and its protocol (lbapp/server.py) read them. `uvicorn lbapp:app` takes
its address from its own flags and has none of these limits.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator, ByteSize, Field, field_validator
from pydantic_settings import BaseSettings

from .config import parse_duration

Seconds = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]


class ServerSettings(BaseSettings):
    """Fields of `Settings` for the launcher and its protocol; field `x` is the variable `LB_X`."""

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    workers: int = Field(default=1, ge=1, le=512)
    graceful_timeout: Seconds = 30.0
    client_header_timeout: Seconds = 10.0
    client_keepalive_timeout: Seconds = 5.0  # uvicorn's default; nginx's is 75 s
    max_header_size: ByteSize = Field(default=ByteSize(32 * 1024), ge=1024, le=1024 * 1024)
    max_header_count: int = Field(default=100, ge=1, le=10_000)

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        value = value.strip().removeprefix("[").removesuffix("]")
        if not value or any(c in value for c in "/ \t?#@"):
            raise ValueError("expected an IP address or host name to listen on, e.g. 0.0.0.0 or ::")
        return value
