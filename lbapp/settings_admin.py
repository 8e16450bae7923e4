"""Settings of the admin API and of runtime changes: who may read the views, who may change
backends and how; how removed backends drain; whether the config file is watched.

A group of its own (mixed into `Settings`) because it is the security boundary of the admin
endpoints; admin.py's `AdminGuard` applies it, runtime.py and reload.py the rest. Defaults are
safe: the views (which reveal backend URLs) are readable from loopback and private networks only,
writes from loopback only, and the bearer token, when set, is never logged or echoed.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode

from .config import SettingsError, parse_duration, parse_networks

# Loopback and the private ranges (RFC 1918, RFC 4193): a Prometheus in the same docker network,
# Kubernetes cluster or VPC can scrape; the internet cannot read backend URLs.
PRIVATE_NETWORKS = ["127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"]
LOOPBACK = ["127.0.0.1/32", "::1/128"]
EVERYONE = ["0.0.0.0/0", "::/0"]
MIN_TOKEN_LENGTH = 16


def parse_allow_list(value: Any) -> Any:
    """A CIDR list as `parse_networks` takes it, where `*` stands for every address."""
    if isinstance(value, str) and value.strip() == "*":
        return list(EVERYONE)
    if isinstance(value, list) and value == ["*"]:
        return list(EVERYONE)
    return parse_networks(value)


AllowList = Annotated[list[str], NoDecode, BeforeValidator(parse_allow_list)]


class AdminSettings(BaseSettings):
    """`LB_ADMIN_ALLOW`, `LB_ADMIN_WRITE_ALLOW`, `LB_ADMIN_TOKEN` (mixed into `Settings`)."""

    admin_allow: AllowList = Field(default_factory=lambda: list(PRIVATE_NETWORKS))
    admin_write_allow: AllowList = Field(default_factory=lambda: list(LOOPBACK))
    admin_token: SecretStr | None = None
    # How long a removed backend drains before it leaves the pool (uvicorn's graceful shutdown
    # and compose's stop grace are about as long).
    drain_timeout: Annotated[float, BeforeValidator(parse_duration), Field(gt=0)] = 30.0
    dns_interval: Annotated[float, BeforeValidator(parse_duration), Field(gt=0)] = 5.0  # re-resolve
    config_watch: bool = False  # reload when the LB_CONFIG file is saved (SIGHUP always reloads)

    @model_validator(mode="after")
    def _check_watch(self) -> AdminSettings:
        if self.config_watch and getattr(self, "config", None) is None:
            raise SettingsError("invalid setting LB_CONFIG_WATCH: watching needs LB_CONFIG (a file)")
        return self

    @field_validator("admin_token", mode="before")
    @classmethod
    def _check_token(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value.strip():
                return None  # empty: no token required
            if len(value) < MIN_TOKEN_LENGTH or not value.isascii() or not value.isprintable():
                raise ValueError(f"must be at least {MIN_TOKEN_LENGTH} printable ASCII characters")
            if value != value.strip():
                raise ValueError("must not start or end with whitespace")
        return value
