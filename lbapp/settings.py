"""Settings: defaults < JSON config file (`LB_CONFIG`) < `settings.env` < environment.

Every setting is an `LB_*` variable. A bad value stops start-up with one line that names the
variable and the reason (`SettingsError`), never a traceback.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings.sources import InitSettingsSource

ENV_PREFIX = "LB_"
ENV_FILE = "settings.env"
DEFAULT_BACKENDS = "http://127.0.0.1:3001,http://127.0.0.1:3002,http://127.0.0.1:3003"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_FALSE_WORDS = {"", "0", "false", "no", "off"}
# Paths of lbapp's own endpoints that are not configurable (probes).
FIXED_PATHS = ("/lb-health", "/lb-ready")
# RFC 9110 token: header names and (RFC 6265) cookie names.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# A route prefix is matched against the raw (percent-encoded) path the client sent.
_PREFIX = re.compile(r"^/[!$&'()*+,\-./0-9:;=@A-Z_a-z~%]*$")


def parse_statuses(value: str) -> frozenset[int]:
    """`200-399`, `200,204`, `500-504,429`: HTTP status codes (100..599) as a set."""
    codes: set[int] = set()
    for item in value.split(","):
        low, sep, high = item.strip().partition("-")
        try:
            first, last = int(low), int(high) if sep else int(low)
        except ValueError:
            raise ValueError("expected status codes or ranges, e.g. 200-399 or 200,204") from None
        if not 100 <= first <= last <= 599:
            raise ValueError("expected status codes or ranges between 100 and 599, e.g. 200-399")
        codes.update(range(first, last + 1))
    return frozenset(codes)


class SettingsError(Exception):
    """A setting is invalid; the message is one line meant for the operator."""


def parse_duration(value: Any) -> Any:
    """Seconds as a number, or a string with a unit: `2`, `0.5`, `250ms`, `2s`, `1m`."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise ValueError("expected a positive number of seconds, e.g. 2, 0.5, 250ms, 1m")
        return float(match.group(1)) * _UNITS[match.group(2)]
    return value


Seconds = Annotated[float, Field(gt=0)]


class BackendSpec(BaseModel):
    """One backend as configured: a base URL and a weight (0 = never picked)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    weight: int = Field(default=1, ge=0, le=1_000_000)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        from urllib.parse import urlsplit

        value = value.strip()
        try:
            parts = urlsplit(value)
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a valid URL ({exc})") from None
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"{value!r}: scheme must be http or https")
        if not parts.hostname:
            raise ValueError(f"{value!r}: no host")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError(f"{value!r}: a backend URL takes no query, fragment or credentials")
        del port
        return value.rstrip("/")


def _split_backends(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"invalid JSON ({exc.msg} at position {exc.pos})") from None
        else:
            value = [item.strip() for item in text.split(",") if item.strip()]
    if isinstance(value, list):
        return [{"url": item} if isinstance(item, str) else item for item in value]
    return value


def check_hash_key(value: str) -> str:
    """`ip`, `path`, `header:<name>` or `cookie:<name>`; header names are lower-cased."""
    value = value.strip()
    kind, _, name = value.partition(":")
    kind = kind.lower()
    if kind in ("ip", "path") and not name:
        return kind
    if kind in ("header", "cookie") and _TOKEN.match(name):
        return f"header:{name.lower()}" if kind == "header" else f"cookie:{name}"
    raise ValueError("expected ip, path, header:<name> or cookie:<name>")


def check_rate_limit(value: str) -> str:
    """`<n>/s`, `<n>/m`, `<n>/h`, or empty / `off` (no limit, as "")."""
    value = value.strip().lower()
    if value in ("", "off"):
        return ""
    from .ratelimit import parse_rate

    parse_rate(value)
    return value.replace(" ", "")


class RouteSpec(BaseModel):
    """One entry of the routes table: requests under `prefix` go to their own backends."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefix: str
    backends: Annotated[list[BackendSpec], Field(min_length=1)]
    algorithm: str | None = None  # None: the top-level LB_ALGORITHM
    strip_prefix: bool = False
    # --- rate limiting (None: the top-level LB_RATE_LIMIT / LB_RATE_LIMIT_BURST; "off": none) ---
    rate_limit: str | None = None
    rate_limit_burst: int | None = Field(default=None, ge=1, le=1_000_000_000)

    @field_validator("rate_limit")
    @classmethod
    def _check_rate_limit(cls, value: str | None) -> str | None:
        return check_rate_limit(value) if value is not None else None

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not _PREFIX.match(value):
            raise ValueError("must start with '/' and hold only URL path characters (no '?', '#', spaces)")
        return value

    @field_validator("backends", mode="before")
    @classmethod
    def _parse_backends(cls, value: Any) -> Any:
        return _split_backends(value)


class Settings(BaseSettings):
    """The load balancer's configuration; field `x` is the variable `LB_X`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=ENV_FILE,
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
    )

    backends: Annotated[list[BackendSpec], NoDecode] = Field(
        default=DEFAULT_BACKENDS,  # type: ignore[arg-type]  # parsed by the validator below
        min_length=1,
    )
    config: Path | None = None
    algorithm: str = "round_robin"
    debug: bool = False

    health_path: str = "/health"
    health_interval: Seconds = 10.0
    health_timeout: Seconds = 3.0
    healthy_threshold: int = Field(default=2, ge=1)
    unhealthy_threshold: int = Field(default=2, ge=1)
    health_method: str = "GET"
    health_expected_status: str = "200-399"
    health_body: str = ""
    health_unhealthy_interval: Annotated[float, Field(ge=0)] = 0.0
    health_jitter: Annotated[float, Field(ge=0, le=1)] = 0.1
    health_type: Literal["http", "tcp"] = "http"

    outlier_consecutive_failures: int = Field(default=5, ge=0)
    outlier_statuses: str = "502,503,504"
    outlier_ejection_time: Seconds = 30.0
    outlier_max_ejection_time: Seconds = 300.0
    outlier_max_ejection_percent: int = Field(default=50, ge=0, le=100)

    backend_max_conns: int = Field(default=0, ge=0)
    queue_size: int = Field(default=100, ge=0)
    queue_timeout: Seconds = 1.0
    slow_start: Annotated[float, Field(ge=0)] = 0.0
    panic_threshold: int = Field(default=0, ge=0, le=100)

    max_retries: int = Field(default=2, ge=0, le=100)
    retry_budget: Annotated[float, Field(ge=0, le=100)] = 20.0
    retry_budget_min: int = Field(default=3, ge=0)
    retry_delay: Annotated[float, Field(ge=0)] = 0.05
    connect_timeout: Seconds = 2.0
    upstream_timeout: Seconds = 10.0
    upstream_idle_timeout: Seconds = 4.0
    upstream_max_connections: int = Field(default=0, ge=0)

    preserve_host: bool = True
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)
    transport: Literal["lean", "httpcore"] = "lean"
    access_log: bool = True
    log_format: Literal["text", "json"] = "text"

    metrics_path: str = "/metrics"
    json_metrics_path: str = "/lb-metrics"
    status_path: str = "/lb-status"
    admin_allow: Annotated[list[str], NoDecode] = Field(default_factory=list)
    admin_write_allow: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.1/32", "::1/128"]
    )
    metrics_flush_interval: Seconds = 1.0

    hash_key: str = "ip"
    sticky_cookie: str = "lbapp_sticky"
    sticky_secret: SecretStr | None = None
    routes: list[RouteSpec] = Field(default_factory=list)

    @field_validator("backends", mode="before")
    @classmethod
    def _parse_backends(cls, value: Any) -> Any:
        return _split_backends(value)

    @field_validator("health_expected_status", "outlier_statuses")
    @classmethod
    def _check_statuses(cls, value: str) -> str:
        parse_statuses(value)
        return value.strip()

    @field_validator("retry_budget", mode="before")
    @classmethod
    def _parse_percent(cls, value: Any) -> Any:
        return value.strip().removesuffix("%") if isinstance(value, str) else value

    @field_validator("health_method")
    @classmethod
    def _check_method(cls, value: str) -> str:
        value = value.strip().upper()
        if not _TOKEN.match(value):
            raise ValueError("expected an HTTP method such as GET or HEAD")
        return value

    @field_validator("outlier_max_ejection_time")
    @classmethod
    def _check_max_ejection(cls, value: float, info: ValidationInfo) -> float:
        base = info.data.get("outlier_ejection_time")
        if base is not None and value < base:
            raise ValueError(f"must be at least LB_OUTLIER_EJECTION_TIME ({base:g} s)")
        return value

    @field_validator("hash_key")
    @classmethod
    def _check_hash_key(cls, value: str) -> str:
        return check_hash_key(value)

    @field_validator("sticky_cookie")
    @classmethod
    def _check_cookie_name(cls, value: str) -> str:
        if not _TOKEN.match(value):
            raise ValueError("must be a cookie name: letters, digits and !#$%&'*+-.^_`|~")
        return value

    @field_validator("sticky_secret", mode="before")
    @classmethod
    def _check_secret(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value.strip():
                return None  # empty: generate one at start-up
            if len(value) < 16:
                raise ValueError("must be at least 16 characters (or empty: random at start-up)")
        return value

    @field_validator("routes")
    @classmethod
    def _check_routes(cls, value: list[RouteSpec]) -> list[RouteSpec]:
        seen: set[str] = set()
        for route in value:
            if route.prefix in seen:
                raise ValueError(f"duplicate prefix {route.prefix!r}")
            seen.add(route.prefix)
        return value

    @field_validator(
        "health_interval",
        "health_timeout",
        "retry_delay",
        "connect_timeout",
        "upstream_timeout",
        "upstream_idle_timeout",
        "metrics_flush_interval",
        "health_unhealthy_interval",
        "outlier_ejection_time",
        "outlier_max_ejection_time",
        "queue_timeout",
        "slow_start",
        mode="before",
    )
    @classmethod
    def _parse_duration(cls, value: Any) -> Any:
        return parse_duration(value)

    @field_validator("debug", mode="before")
    @classmethod
    def _parse_debug(cls, value: Any) -> Any:
        # The original turned debug on for any non-empty value; "0"/"false"/"no"/"off" stay off.
        if isinstance(value, str):
            return value.strip().lower() not in _FALSE_WORDS
        return value

    @field_validator("health_path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with '/'")
        return value

    @field_validator("metrics_path", "json_metrics_path", "status_path")
    @classmethod
    def _check_admin_path(cls, value: str, info: ValidationInfo) -> str:
        # An empty path turns the endpoint off (the path is then proxied like any other).
        if value == "":
            return value
        if not value.startswith("/") or any(c in value for c in "{}?#% \t"):
            raise ValueError("must be empty or a plain path starting with '/' (no {}, ?, #, %, spaces)")
        if value in FIXED_PATHS:
            raise ValueError(f"{value!r} is already lbapp's own probe endpoint")
        for other in ("metrics_path", "json_metrics_path"):
            if other != info.field_name and info.data.get(other) == value:
                raise ValueError(f"{value!r} is already LB_{other.upper()}")
        return value

    @field_validator("trusted_proxies", "admin_allow", "admin_write_allow", mode="before")
    @classmethod
    def _parse_networks(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
        if isinstance(value, list):
            for item in value:
                try:
                    ipaddress.ip_network(str(item), strict=False)
                except ValueError:
                    raise ValueError(f"{item!r} is not an IP network (CIDR) or address") from None
        return value

    # --- rate limiting ---
    rate_limit: str = ""  # <n>/s, <n>/m, <n>/h; empty: off
    rate_limit_burst: int | None = Field(default=None, ge=1, le=1_000_000_000)  # None: n
    rate_limit_key: str = "ip"  # ip | header:<Name>
    rate_limit_ipv6_prefix: int = Field(default=64, ge=1, le=128)
    rate_limit_redis_url: str = ""  # empty: buckets in this instance (shared by its workers)
    rate_limit_redis_timeout: Seconds = 0.05
    rate_limit_fail_open: bool = True
    rate_limit_max_keys: int = Field(default=100_000, ge=16, le=100_000_000)

    @field_validator("rate_limit")
    @classmethod
    def _check_rate_limit(cls, value: str) -> str:
        return check_rate_limit(value)

    @field_validator("rate_limit_burst", mode="before")
    @classmethod
    def _empty_burst(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("rate_limit_burst")
    @classmethod
    def _check_burst(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("rate_limit"):
            raise ValueError("needs LB_RATE_LIMIT (a burst of no rate)")
        return value

    @field_validator("rate_limit_key")
    @classmethod
    def _check_rate_limit_key(cls, value: str) -> str:
        from .ratelimit import check_key

        return check_key(value)

    @field_validator("rate_limit_redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        from urllib.parse import urlsplit

        value = value.strip()
        if value:
            try:
                parts = urlsplit(value)
                port = parts.port
            except ValueError:
                raise ValueError("not a valid URL") from None
            if parts.scheme not in ("redis", "rediss", "unix"):
                raise ValueError("expected redis://host:port/db, rediss://... or unix:///path")
            if parts.scheme != "unix" and not parts.hostname:
                raise ValueError("no host")
            del port
        return value

    @field_validator("rate_limit_redis_timeout", mode="before")
    @classmethod
    def _parse_redis_timeout(cls, value: Any) -> Any:
        return parse_duration(value)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config = _config_file_source(settings_cls, env_settings, dotenv_settings)
        return (init_settings, _FileOnly(env_settings), _FileOnly(dotenv_settings), config)


class _FileOnly(PydanticBaseSettingsSource):
    """An environment source that refuses the settings which belong in the config file only."""

    FILE_ONLY = ("routes",)

    def __init__(self, inner: PydanticBaseSettingsSource) -> None:
        super().__init__(inner.settings_cls)
        self.inner = inner

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self.inner.get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        data = self.inner()
        for name in self.FILE_ONLY:
            if name in data:
                raise SettingsError(
                    f"invalid setting {ENV_PREFIX}{name.upper()}: set it in the LB_CONFIG file, "
                    "not the environment"
                )
        return data


def _config_file_source(
    settings_cls: type[BaseSettings],
    env_settings: PydanticBaseSettingsSource,
    dotenv_settings: PydanticBaseSettingsSource,
) -> PydanticBaseSettingsSource:
    """The JSON file named by LB_CONFIG (environment first, then settings.env)."""
    path = os.environ.get(f"{ENV_PREFIX}CONFIG")
    if path is None:
        path = dotenv_settings().get("config")
    data: dict[str, Any] = {}
    if path:
        data = read_config_file(Path(path))
    return InitSettingsSource(settings_cls, init_kwargs=data)


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(f"LB_CONFIG: cannot read {str(path)!r}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise SettingsError(
            f"LB_CONFIG: {str(path)!r} is not valid JSON: {exc.msg} (line {exc.lineno})"
        ) from None
    if not isinstance(data, dict):
        raise SettingsError(f"LB_CONFIG: {str(path)!r} must hold a JSON object")
    known = set(Settings.model_fields)
    data = {key.lower().removeprefix("lb_"): value for key, value in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SettingsError(f"LB_CONFIG: {str(path)!r} has unknown setting {unknown[0]!r}")
    return data


_SECRET_FIELDS = {"sticky_secret", "rate_limit_redis_url"}


def _describe(error: Any) -> str:
    loc = [str(part) for part in error["loc"]]
    name = f"{ENV_PREFIX}{loc[0].upper()}" if loc else "settings"
    for part in loc[1:]:
        name += f"[{part}]" if part.isdigit() else f".{part}"
    message = str(error["msg"]).removeprefix("Value error, ")
    value = error.get("input")
    if loc and loc[0] in _SECRET_FIELDS:
        value = None  # never echo a secret into a log
    if isinstance(value, str | int | float) and not isinstance(value, bool) and len(str(value)) < 80:
        message += f" (got {value!r})"
    return f"invalid setting {name}: {message}"


def load_settings(**overrides: Any) -> Settings:
    """Build the settings, turning any validation error into one `SettingsError` line."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(_describe(exc.errors()[0])) from None
    except (ValueError, json.JSONDecodeError) as exc:  # a source that failed to decode a value
        raise SettingsError(f"invalid setting: {str(exc).splitlines()[0]}") from None
