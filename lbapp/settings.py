"""Settings: defaults < JSON config file (`LB_CONFIG`) < `settings.env` < environment.

Every setting is an `LB_*` variable, held here as the parsed type the code uses (seconds as
floats, status lists as sets, networks checked, the policy name validated). A bad value stops
start-up with one line that names the variable and the reason (`SettingsError`), never a
traceback. Where values come from and how strings are parsed: config.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from .balancers import check_algorithm
from .config import (
    ENV_PREFIX,
    TOKEN,
    FileOnlySource,
    SettingsError,
    check_hash_key,
    config_file_source,
    describe,
    parse_duration,
    parse_networks,
    parse_size,
    parse_statuses,
    split_backends,
)
from .limitsettings import RateLimitSettings, RouteRateLimit
from .server_settings import ServerSettings
from .settings_admin import AdminSettings
from .websocket_settings import WebSocketSettings

__all__ = ["BackendSpec", "RouteSpec", "Settings", "SettingsError", "load_settings"]

ENV_FILE = "settings.env"
DEFAULT_BACKENDS = "http://127.0.0.1:3001,http://127.0.0.1:3002,http://127.0.0.1:3003"
_FALSE_WORDS = {"", "0", "false", "no", "off"}
# Paths of lbapp's own endpoints that are not configurable (probes).
FIXED_PATHS = ("/lb-health", "/lb-ready")
# A route prefix is matched against the (dot-segment normalised) path the client sent.
_PREFIX = re.compile(r"^/[!$&'()*+,\-./0-9:;=@A-Z_a-z~%]*$")

Seconds = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]
SecondsOrZero = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]
Statuses = Annotated[frozenset[int], NoDecode, BeforeValidator(parse_statuses)]
NetworkList = Annotated[list[str], NoDecode, BeforeValidator(parse_networks)]
Algorithm = Annotated[str, AfterValidator(check_algorithm)]
Bytes = Annotated[int, BeforeValidator(parse_size), Field(ge=0)]


class BackendSpec(BaseModel):
    """One backend as configured: a base URL and a weight (0 = never picked); with `"discovery":
    "dns"`, one backend per A/AAAA record of the URL's host (discovery.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    weight: int = Field(default=1, ge=0, le=1_000_000)
    discovery: Literal["dns"] | None = None

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        value = value.strip()
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018  # raises on a bad port
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a valid URL ({exc})") from None
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"{value!r}: scheme must be http or https")
        if not parts.hostname:
            raise ValueError(f"{value!r}: no host")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError(f"{value!r}: a backend URL takes no query, fragment or credentials")
        return value.rstrip("/")


class RouteSpec(RouteRateLimit):
    """One entry of the routes table: requests under `prefix` go to their own backends."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefix: str
    backends: Annotated[list[BackendSpec], Field(min_length=1), BeforeValidator(split_backends)]
    algorithm: Algorithm | None = None  # None: the top-level LB_ALGORITHM
    strip_prefix: bool = False

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not _PREFIX.match(value):
            raise ValueError("must start with '/' and hold only URL path characters (no '?', '#', spaces)")
        if value == "/":
            raise ValueError("'/' is the default pool: set its backends with LB_BACKENDS")
        return value


class Settings(ServerSettings, WebSocketSettings, AdminSettings, RateLimitSettings):  # their modules
    """The load balancer's configuration; field `x` is the variable `LB_X`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=ENV_FILE,
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
    )

    backends: Annotated[list[BackendSpec], NoDecode, BeforeValidator(split_backends)] = Field(
        default=DEFAULT_BACKENDS,  # type: ignore[arg-type]  # parsed by split_backends
        min_length=1,
    )
    config: Path | None = None
    algorithm: Algorithm = "round_robin"
    debug: bool = False

    health_path: str = ""  # empty: a TCP connect check, like HAProxy's `check`
    health_interval: Seconds = 10.0
    health_timeout: Seconds = 3.0
    healthy_threshold: int = Field(default=2, ge=1)
    unhealthy_threshold: int = Field(default=2, ge=1)
    health_method: str = "GET"
    health_expected_status: Statuses = frozenset(range(200, 400))
    health_body: str = ""
    health_unhealthy_interval: SecondsOrZero = 0.0
    health_jitter: Annotated[float, Field(ge=0, le=1)] = 0.1
    health_type: Literal["http", "tcp"] | None = None  # None: http with a path, else tcp

    outlier_consecutive_failures: int = Field(default=5, ge=0)
    outlier_statuses: Statuses = frozenset({502, 503, 504})
    outlier_ejection_time: Seconds = 30.0
    outlier_max_ejection_time: Seconds = 300.0
    outlier_max_ejection_percent: int = Field(default=50, ge=0, le=100)

    backend_max_conns: int = Field(default=0, ge=0)
    queue_size: int = Field(default=100, ge=0)
    queue_timeout: Seconds = 1.0
    slow_start: SecondsOrZero = 0.0
    panic_threshold: int = Field(default=0, ge=0, le=100)

    max_retries: int = Field(default=2, ge=0, le=100)
    retry_budget: Annotated[float, Field(ge=0, le=100)] = 20.0
    retry_budget_min: int = Field(default=3, ge=0)
    retry_delay: SecondsOrZero = 0.05
    connect_timeout: Seconds = 2.0
    upstream_timeout: Seconds = 10.0
    upstream_idle_timeout: Seconds = 4.0
    upstream_max_connections: int = Field(default=1024, ge=0)  # per backend, as Envoy's default

    # The front door: what one client may cost (see the README's Security section).
    client_body_timeout: Seconds = 30.0
    request_buffer: Bytes = 64 * 1024
    max_body_size: Bytes = 0
    max_in_flight: int = Field(default=0, ge=0)
    allow_trace: bool = False
    shutdown_delay: SecondsOrZero = 0.0

    preserve_host: bool = True
    trusted_proxies: NetworkList = Field(default_factory=list)
    transport: Literal["lean", "httpcore"] = "lean"
    access_log: bool = True
    log_format: Literal["text", "json"] = "text"

    metrics_path: str = "/metrics"
    json_metrics_path: str = "/lb-metrics"
    status_path: str = "/lb-status"
    metrics_flush_interval: Seconds = 1.0

    hash_key: Annotated[str, AfterValidator(check_hash_key)] = "ip"
    sticky_cookie: str = "lbapp_sticky"
    sticky_secret: SecretStr | None = None
    routes: list[RouteSpec] = Field(default_factory=list)

    @field_validator("retry_budget", mode="before")
    @classmethod
    def _parse_percent(cls, value: Any) -> Any:
        return value.strip().removesuffix("%") if isinstance(value, str) else value

    @field_validator("health_method")
    @classmethod
    def _check_method(cls, value: str) -> str:
        value = value.strip().upper()
        if not TOKEN.match(value):
            raise ValueError("expected an HTTP method such as GET or HEAD")
        return value

    @field_validator("outlier_max_ejection_time")
    @classmethod
    def _check_max_ejection(cls, value: float, info: ValidationInfo) -> float:
        base = info.data.get("outlier_ejection_time")
        if base is not None and value < base:
            raise ValueError(f"must be at least LB_OUTLIER_EJECTION_TIME ({base:g} s)")
        return value

    @field_validator("sticky_cookie")
    @classmethod
    def _check_cookie_name(cls, value: str) -> str:
        if not TOKEN.match(value):
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
        if value and not value.startswith("/"):
            raise ValueError("must be empty (a TCP check) or start with '/'")
        return value

    @field_validator("health_type")
    @classmethod
    def _resolve_health_type(cls, value: str | None, info: ValidationInfo) -> str:
        path = info.data.get("health_path")
        if value is None:
            return "http" if path else "tcp"
        if value == "http" and not path:
            raise ValueError("an http check needs LB_HEALTH_PATH (e.g. /health)")
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

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config = config_file_source(settings_cls, env_settings, dotenv_settings)
        return (init_settings, FileOnlySource(env_settings), FileOnlySource(dotenv_settings), config)


def load_settings(**overrides: Any) -> Settings:
    """Build the settings, turning any validation error into one `SettingsError` line."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(describe(exc.errors()[0])) from None
    except (ValueError, json.JSONDecodeError) as exc:  # a source that failed to decode a value
        raise SettingsError(f"invalid setting: {str(exc).splitlines()[0]}") from None
