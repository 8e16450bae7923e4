"""The rate-limit settings (`LB_RATE_LIMIT*`, and a route's `rate_limit`/`rate_limit_burst`).

Field blocks that `Settings` and `RouteSpec` (settings.py) inherit, so the rate-limit settings
stay together and settings.py stays readable in one go. Parsed here into the values
ratelimit.py uses; a bad value stops start-up with settings.py's one-line `SettingsError`.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, ValidationInfo, field_validator

from .config import parse_duration
from .ratelimit import check_key, check_rate, check_redis_url, none_if_empty

Burst = Annotated[int, Field(ge=1, le=1_000_000_000)]
Rate = Annotated[str, BeforeValidator(check_rate)]  # <n>/s, <n>/m, <n>/h; "" (or "off"): none


class RouteRateLimit(BaseModel):
    """A route's own limit; None: the top-level one (`"rate_limit": "off"`: none for the route)."""

    rate_limit: Annotated[str | None, BeforeValidator(check_rate)] = None
    rate_limit_burst: Burst | None = None


class RateLimitSettings(BaseModel):
    """`LB_RATE_LIMIT*`: README "Rate limiting"; defaults and reasons in settings.env.example."""

    rate_limit: Rate = ""  # empty: off
    rate_limit_burst: Annotated[Burst | None, BeforeValidator(none_if_empty)] = None  # None: n
    rate_limit_key: Annotated[str, AfterValidator(check_key)] = "ip"  # ip | header:<Name>
    rate_limit_ipv6_prefix: int = Field(default=64, ge=1, le=128)
    rate_limit_redis_url: Annotated[str, AfterValidator(check_redis_url)] = ""  # empty: no Redis
    rate_limit_redis_timeout: Annotated[float, BeforeValidator(parse_duration), Field(gt=0)] = 0.05
    rate_limit_fail_open: bool = True
    rate_limit_max_keys: int = Field(default=100_000, ge=16, le=100_000_000)

    @field_validator("rate_limit_burst")
    @classmethod
    def _check_burst(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("rate_limit"):
            raise ValueError("needs LB_RATE_LIMIT (a burst of no rate)")
        return value
