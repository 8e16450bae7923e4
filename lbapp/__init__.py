"""lbapp: an HTTP load balancer served by uvicorn (`lbapp`, or `uvicorn lbapp:app`)."""

from __future__ import annotations

import sys
from typing import Any

from .application import create_app
from .settings import Settings, SettingsError, load_settings
from .version import VERSION

__all__ = ["Settings", "SettingsError", "app", "create_app", "load_settings"]
__version__ = VERSION

_app: Any = None


def __getattr__(name: str) -> Any:
    """`lbapp.app`, the entry point of `uvicorn lbapp:app`: built on first access, so importing
    lbapp in tests reads no environment; as an entry point it also configures logging."""
    global _app
    if name != "app":
        raise AttributeError(f"module 'lbapp' has no attribute {name!r}")
    if _app is None:
        from .logs import configure_logging

        try:
            settings = load_settings()
            configure_logging(settings.debug, settings.access_log, settings.log_format)
            _app = create_app(settings)
        except SettingsError as exc:
            print(f"lbapp: {exc}", file=sys.stderr)
            raise SystemExit(1) from None
    return _app
