"""Where settings come from and how their values are parsed.

Sources, in order of precedence: the environment, `settings.env`, the JSON file named by
`LB_CONFIG`, the defaults. The parsers turn operator-friendly strings (`250ms`, `200-399`,
`a,b,c`) into typed values; a bad value becomes one `SettingsError` line naming the variable.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Any

from pydantic_settings import BaseSettings, PydanticBaseSettingsSource
from pydantic_settings.sources import InitSettingsSource

ENV_PREFIX = "LB_"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# RFC 9110 token: header names and (RFC 6265) cookie names.
TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
SECRET_FIELDS = {"sticky_secret", "admin_token", "rate_limit_redis_url"}


class SettingsError(Exception):
    """A setting is invalid; the message is one line meant for the operator."""


def parse_statuses(value: Any) -> Any:
    """`200-399`, `200,204`, `500-504,429`: HTTP status codes (100..599) as a set."""
    if not isinstance(value, str):
        return value  # already parsed (a set given in code)
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


def parse_duration(value: Any) -> Any:
    """Seconds as a number, or a string with a unit: `2`, `0.5`, `250ms`, `2s`, `1m`."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise ValueError("expected a positive number of seconds, e.g. 2, 0.5, 250ms, 1m")
        return float(match.group(1)) * _UNITS[match.group(2)]
    return value


_SIZE = re.compile(r"^\s*(\d+)\s*(b|k|kb|kib|m|mb|mib|g|gb|gib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
               "g": 1 << 30, "gb": 10**9, "gib": 1 << 30}  # fmt: skip


def parse_size(value: Any) -> Any:
    """Bytes as an integer, or with a unit: `65536`, `64KiB`, `10MiB`, `1MB` (k/m/g: binary)."""
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match is None:
            raise ValueError("expected a size in bytes, e.g. 65536, 64KiB, 10MiB")
        return int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()]
    return value


def split_backends(value: Any) -> Any:
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
    if kind in ("header", "cookie") and TOKEN.match(name):
        return f"header:{name.lower()}" if kind == "header" else f"cookie:{name}"
    raise ValueError("expected ip, path, header:<name> or cookie:<name>")


def parse_networks(value: Any) -> Any:
    """`10.0.0.0/8, ::1`: a list of CIDR networks or addresses, each checked."""
    if isinstance(value, str):
        value = [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, list):
        for item in value:
            try:
                ipaddress.ip_network(str(item), strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP network (CIDR) or address") from None
    return value


class FileOnlySource(PydanticBaseSettingsSource):
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


def config_file_source(
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
        data = read_config_file(Path(path), set(settings_cls.model_fields))
    return InitSettingsSource(settings_cls, init_kwargs=data)


def read_config_file(path: Path, known: set[str]) -> dict[str, Any]:
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
    data = {key.lower().removeprefix("lb_"): value for key, value in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SettingsError(f"LB_CONFIG: {str(path)!r} has unknown setting {unknown[0]!r}")
    return data


def describe(error: Any) -> str:
    loc = [str(part) for part in error["loc"]]
    name = f"{ENV_PREFIX}{loc[0].upper()}" if loc else "settings"
    for part in loc[1:]:
        name += f"[{part}]" if part.isdigit() else f".{part}"
    message = str(error["msg"]).removeprefix("Value error, ")
    value = error.get("input")
    if loc and loc[0] in SECRET_FIELDS:
        value = None  # never echo a secret into a log
    if isinstance(value, str | int | float) and not isinstance(value, bool) and len(str(value)) < 80:
        message += f" (got {value!r})"
    return f"invalid setting {name}: {message}"
